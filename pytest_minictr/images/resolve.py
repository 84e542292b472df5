"""What a caller names as a container's root, as an `Image`: an `Image` as it is; a reference
looked up in the store, or pulled, as `pull=` says (Docker's `--pull`)."""

from __future__ import annotations

from pytest_minictr.errors import ConfigError, MinictrError
from pytest_minictr.images.image import Image


def resolve(ref_or_image: Image | str, pull: str = "missing") -> Image:
    """The image `ref_or_image` names: from the store, pulled first if `pull` says so
    ("missing": only if the store lacks it; "always"; "never": ConfigError if it lacks it;
    `keywords` checked the word)."""
    if isinstance(ref_or_image, Image):
        return ref_or_image
    # the registry client (urllib, ssl, threads) is loaded only when a reference is run
    from pytest_minictr.images.pull import pull as pull_image
    from pytest_minictr.images.store import Store
    if pull != "always":
        found = Store().lookup(ref_or_image)
        if found is not None:
            return found
        if pull == "never":
            raise ConfigError(f"image {ref_or_image!r} is not in the store, and pull='never' "
                              f"(pull it first: minictr pull {ref_or_image})")
    try:
        return pull_image(ref_or_image)
    except MinictrError as error:  # a run's caller asked for a rootfs: say it was an image
        raise type(error)(f"image {ref_or_image!r}: {error}") from error

"""What a caller names as a container's root, as an `Image`: an `Image` as it is; a reference
looked up in the store, or pulled, as `pull=` says (Docker's `--pull`)."""

from __future__ import annotations

import importlib
from typing import Any

from pytest_minictr.errors import ConfigError
from pytest_minictr.images.image import Image

# The store and the registry client are the image store's own modules; looked up by name so
# that a build without them still runs images given as `Image` values.
STORE_MODULE = "pytest_minictr.images.store"


def resolve(ref_or_image: Image | str, pull: str = "missing") -> Image:
    """The image `ref_or_image` names: from the store, pulled first if `pull` says so
    ("missing": only if the store lacks it; "always"; "never": ConfigError if it lacks it;
    `keywords` checked the word)."""
    if isinstance(ref_or_image, Image):
        return ref_or_image
    store = _store_module(ref_or_image)
    if pull != "always":
        found: Image | None = store.Store().lookup(ref_or_image)
        if found is not None:
            return found
        if pull == "never":
            raise ConfigError(f"image {ref_or_image!r} is not in the store, and pull='never' "
                              f"(pull it first: minictr pull {ref_or_image})")
    pulled: Image = store.pull(ref_or_image)
    return pulled


def _store_module(reference: str) -> Any:
    try:
        return importlib.import_module(STORE_MODULE)
    except ModuleNotFoundError as error:
        if error.name != STORE_MODULE:
            raise
        raise ConfigError(f"image {reference!r}: this build of minictr has no image store "
                          "(only a rootfs directory or an Image value can be run)") from None

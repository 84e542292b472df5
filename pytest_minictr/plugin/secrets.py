"""What of the host's secrets a sandboxed test body does not get (see `sandbox`): the homes
of the host's accounts, its password hashes and host keys, and the worker's environment
variables that look like credentials. Decided in the worker; the body's plan covers the paths
(`container.body_mounts`) and the body drops the variables before the test function runs.

The rules, which docs/security.md repeats:
- hidden homes: /root, every /home/*, and the home of every account of uid 0 or >= 1000 in
  /etc/passwd; never "/" or a top-level directory other than /root (a system account's
  "home" such as /bin or /var), nor one under /tmp (the body's /tmp is its own, over the
  host's), /proc, /sys or /dev. What the test needs inside a hidden home is bound back
  read-only (`Hiding.shown`): the rootdir, the invocation and working directories, sys.prefix,
  sys.base_prefix, the directories of sys.path, the base of tmp_path; `writable=` paths are
  bound there writable by the body's plan.
- hidden files: SECRET_PATHS (those the host has: /run among them) and the SSH host keys.
- dropped variables: those `looks_like_credential` names, as pytest started (see
  `dropped_names`); a name given to --minictr-keep-env (ini minictr_keep_env,
  MINICTR_KEEP_ENV) is kept, and a marker's `env=` sets its names whatever they look like.
"""

from __future__ import annotations

import functools
import glob
import os
import pwd
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

FIRST_USER_UID = 1000  # login.defs' UID_MIN on every common distribution
SECRET_PATHS = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-",
                "/etc/security/opasswd", "/etc/ssl/private",
                # an empty /run, as a container has: no host daemon's unix socket (Docker's,
                # containerd's, D-Bus's, systemd's: peers that take the body's root for the
                # host's), no /run/user/*, no mounted secrets (/run/secrets, /var/run/secrets)
                "/run")
SSH_HOST_KEYS = "/etc/ssh/ssh_host_*_key"
NEVER_HOMES = ("/tmp", "/proc", "/sys", "/dev")
# Parts of a variable's name (split at anything not a letter or digit) that mark it
_CONTAINED = ("SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")   # PGPASSWORD, CLIENTSECRET
_ENDINGS = ("TOKEN", "TOKENS", "KEY", "KEYS")     # GH_TOKEN, APIKEY; not TOKENIZERS, KEYRING
_WHOLE = ("PASS", "PASSPHRASE", "AUTHORIZATION", "COOKIE")    # DB_PASS
_PREFIXES = ("AWS_",)  # every AWS_* variable: its keys, session and profile


# The pid of pytest-xdist's controller and the names of the credential-looking variables it
# started with, for its workers: they start after its conftests ran, with what those set.
HOST_NAMES_VARIABLE = "MINICTR_HOST_ENV_NAMES"


def _started_with() -> dict[str, str]:
    """The environment as pytest started (this module is loaded with the plugin, before any
    conftest): what the host, a CI runner, put there. A variable the suite sets or changes
    later (a fixture's fake token) is the suite's own: dropping it would fail the test."""
    snapshot = dict(os.environ)
    controller, *host = (snapshot.get(HOST_NAMES_VARIABLE) or "-").split()
    # a worker is its controller's child; a pytest a test runs inherits both variables
    if "PYTEST_XDIST_WORKER" in snapshot and controller == str(os.getppid()):
        return {name: value for name, value in snapshot.items() if name in host}
    os.environ[HOST_NAMES_VARIABLE] = " ".join(
        [str(os.getpid()), *sorted(filter(looks_like_credential, snapshot))])
    return snapshot


@dataclass(frozen=True)
class Hiding:
    """Host paths a body does not see, and those inside them it sees again (read-only)."""

    hidden: tuple[str, ...]
    shown: tuple[str, ...]


def hiding(needed: Iterable[str]) -> Hiding:
    """The homes and secret paths hidden; of `needed` (paths the test must see), those
    inside a hidden one, the outermost only. A needed path above a home ("/", /home) does
    not show the homes below it."""
    hidden = (*host_homes(), *secret_files())
    inside = sorted({path for path in map(os.path.realpath, needed)
                     if any(_within(path, top) for top in hidden)})
    shown = tuple(path for path in inside
                  if not any(_within(path, other) and path != other for other in inside))
    return Hiding(hidden, shown)


@functools.cache
def host_homes() -> tuple[str, ...]:
    """The homes to hide, resolved, the outermost only (see the module's rules)."""
    candidates = {"/root", *glob.glob("/home/*")}
    candidates.update(entry.pw_dir for entry in pwd.getpwall()
                      if entry.pw_uid == 0 or entry.pw_uid >= FIRST_USER_UID)
    homes = sorted({os.path.realpath(path) for path in candidates if path.startswith("/")})
    homes = [home for home in homes if os.path.isdir(home) and _may_hide(home)]
    return tuple(home for home in homes
                 if not any(_within(home, other) and home != other for other in homes))


def _may_hide(home: str) -> bool:
    if any(_within(home, top) for top in NEVER_HOMES):
        return False
    return home == "/root" or home.count("/") >= 2


@functools.cache
def secret_files() -> tuple[str, ...]:
    paths = (*SECRET_PATHS, *sorted(glob.glob(SSH_HOST_KEYS)))
    return tuple(dict.fromkeys(os.path.realpath(path) for path in paths
                               if os.path.lexists(path)))


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def looks_like_credential(name: str) -> bool:
    """A name starting with AWS_, or one of whose word parts (split at '_' and any other
    non-alphanumeric) contains SECRET, PASSWORD, PASSWD or CREDENTIAL; ends in TOKEN(S) or
    KEY(S); is PASS, PASSPHRASE, AUTHORIZATION or COOKIE; or is AUTH, begins or ends with it
    without being AUTHOR... (GIT_AUTHOR_NAME stays; OAUTH_CLIENT_ID, SSH_AUTH_SOCK go).
    Stays: PYTHONHASHSEED, TOKENIZERS_PARALLELISM, PYTHON_KEYRING_BACKEND, XAUTHORITY."""
    upper = name.upper()
    if upper.startswith(_PREFIXES):
        return True
    return any(_credential_word(word) for word in re.split(r"[^A-Z0-9]+", upper) if word)


def _credential_word(word: str) -> bool:
    return (any(part in word for part in _CONTAINED) or word.endswith(_ENDINGS)
            or word in _WHOLE
            or ((word.startswith("AUTH") or word.endswith("AUTH"))
                and not word.startswith("AUTHOR")))


_STARTED_WITH = _started_with()


def dropped_names(environ: Mapping[str, str], keep: Iterable[str]) -> tuple[str, ...]:
    """The names of `environ` a body goes without, sorted; never their values: those that
    look like credentials and hold what they held when pytest started."""
    kept = set(keep)
    return tuple(sorted(name for name, value in environ.items()
                        if name not in kept and looks_like_credential(name)
                        and _STARTED_WITH.get(name) == value))


def header(environ: Mapping[str, str], keep: Iterable[str]) -> str:
    """The pytest header's line on the policy: what is hidden, which variables go."""
    homes = host_homes()
    shown_homes = ", ".join(homes[:4]) + (f" and {len(homes) - 4} more" if len(homes) > 4
                                          else "")
    dropped = dropped_names(environ, keep)
    names = f" ({', '.join(dropped)})" if dropped else ""
    return (f"minictr: sandboxed bodies do not see the homes {shown_homes or '(none)'} "
            f"(but what the test needs there), /etc/shadow, /etc/gshadow, SSH host keys, "
            f"/run; their environment drops {len(dropped)} credential-looking "
            f"variables{names}: keep one with --minictr-keep-env NAME")

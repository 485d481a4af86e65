"""The exception tree of hypeman-images.

Every error the library raises on purpose derives from :class:`HypemanError`,
whose message is written for the person running the tool: it says what went
wrong and, where there is one, what to do next. Callers choose what to do
by class, never by searching the message::

    HypemanError
    ├── InvalidReference        the image name does not parse        (exit 2, HTTP 400)
    ├── InvalidArgument         another user input is malformed      (exit 2, HTTP 400)
    │   └── InvalidPlatform     not an os/arch[/variant] of a Linux image (exit 2, HTTP 400)
    ├── NotFound                repository, tag or digest unknown    (exit 3, HTTP 404)
    │   └── PlatformNotFound    the index lacks the asked platform   (exit 6, HTTP 404)
    ├── Unauthorized            the registry refused the credentials (exit 4, HTTP 424)
    ├── RateLimited             the registry said 429                (exit 5, HTTP 429)
    ├── RegistryError           any other registry failure           (exit 1, HTTP 502)
    │   ├── TransientError      5xx or connection trouble, retried   (exit 1, HTTP 502)
    │   └── UnsupportedManifest schema 1 and other unknown formats   (exit 7, HTTP 422)
    ├── DigestMismatch          bytes differ from their digest       (exit 8, HTTP 502)
    ├── LayerError              a layer is corrupt or hostile        (exit 7, HTTP 422)
    ├── DiskArtifactInvalid     a shared disk artifact is broken or hostile (exit 7, HTTP 422)
    ├── LimitExceeded           a configured safety limit was hit    (exit 7, HTTP 422)
    ├── ToolError               mke2fs/e2fsck/debugfs missing or failing (exit 9, HTTP 500)
    ├── Conflict                the image is being built; retry later (exit 1, HTTP 409)
    ├── StorageError            the data dir cannot be written (full disk, permissions)
    │                                                               (exit 10, HTTP 507)
    ├── CorruptDisk             a built disk fails e2fsck or its sha256 (exit 12, HTTP 500)
    ├── ServiceError            ``serve`` cannot listen on its address (exit 13, HTTP 500)
    └── BootError               the VM did not boot or run the command (exit 11, HTTP 500)

Each class's ``exit_code`` is the one source of the CLI's exit codes:
:func:`exit_codes` walks the tree into the table that ``hypeman-images --help``
prints (tests/cli/test_cli.py) and tests/test_errors.py holds this drawing
to the classes. Foreign exceptions (``httpx``, ``OSError``,
``CalledProcessError``) are translated at the module that meets them, with
``raise ... from exc``.

A message says what went wrong for any reader (``detail``); advice on what to
do next depends on who reads it, so an error may carry two: ``hint`` in the
CLI's terms ("hypeman-images login REGISTRY") and ``api_hint`` in the REST
API's ("give credentials in the request"). ``message`` (and ``str()``) is the
CLI's text, :attr:`HypemanError.api_message` the API's; a record of a failed
build keeps ``detail``, which both show.

``Unauthorized`` is HTTP 424 (Failed Dependency), not 401: 401 means the API's
own bearer token was refused (docs/api.md, "Errors"), and a client must be able
to tell "my API token is wrong" from "the registry refused its credentials".
"""

from __future__ import annotations


class HypemanError(Exception):
    """Root of every error the library raises on purpose.

    ``exit_code`` is what the CLI exits with; ``http_status`` is what the API answers;
    ``code`` is the stable machine-readable name both print in JSON errors;
    ``summary`` is a few words for the exit-code table (:func:`exit_codes`), and a
    class that changes ``exit_code`` sets its own (tests/test_errors.py).
    """

    code: str = "internal_error"
    summary: str = "other failure"
    exit_code: int = 1
    http_status: int = 500

    def __init__(
        self, message: str, *, hint: str | None = None, api_hint: str | None = None
    ) -> None:
        """``message`` says what went wrong; ``hint`` and ``api_hint`` what to do, for
        the CLI and for the REST API (module docstring)."""
        self.detail = message
        self.hint = hint
        self.api_hint = api_hint
        self.message = f"{message} ({hint})" if hint else message
        super().__init__(self.message)

    @property
    def api_message(self) -> str:
        """The message for an API error body: no CLI advice, the API's instead."""
        return f"{self.detail} ({self.api_hint})" if self.api_hint else self.detail

    def __str__(self) -> str:
        return self.message


class InvalidReference(HypemanError):
    """The image name does not follow the reference grammar."""

    code = "invalid_name"
    summary = "invalid image name"
    exit_code = 2
    http_status = 400


class InvalidArgument(HypemanError):
    """A user-supplied value other than an image name is malformed."""

    code = "invalid_argument"
    summary = "bad usage or argument"
    exit_code = 2
    http_status = 400


class InvalidPlatform(InvalidArgument):
    """A platform is not ``os/arch[/variant]`` (or a form docker accepts) of a Linux image."""

    code = "invalid_platform"


class NotFound(HypemanError):
    """The repository, tag, digest or local image does not exist."""

    code = "not_found"
    summary = "not found"
    exit_code = 3
    http_status = 404


class PlatformNotFound(NotFound):
    """An image index offers no manifest for the requested platform."""

    code = "platform_not_found"
    summary = "platform not in the index"
    exit_code = 6


class Unauthorized(HypemanError):
    """The registry refused the request for lack of valid credentials.

    HTTP 424, never 401: that is the API's own token (module docstring).
    """

    code = "registry_unauthorized"
    summary = "unauthorized"
    exit_code = 4
    http_status = 424


class RateLimited(HypemanError):
    """The registry answered 429. Never retried silently."""

    code = "rate_limited"
    summary = "rate limited"
    exit_code = 5
    http_status = 429

    def __init__(
        self,
        message: str,
        retry_after: float | None = None,
        *,
        hint: str | None = None,
        api_hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint, api_hint=api_hint)
        self.retry_after = retry_after


class RegistryError(HypemanError):
    """The registry failed in a way not covered by a more specific class."""

    code = "registry_error"
    summary = "registry error"
    exit_code = 1
    http_status = 502

    def __init__(
        self,
        message: str,
        status: int | None = None,
        codes: tuple[str, ...] = (),
        *,
        hint: str | None = None,
        api_hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint, api_hint=api_hint)
        self.status = status
        self.codes = codes


class TransientError(RegistryError):
    """A failure worth retrying: 5xx, timeouts, dropped connections."""

    code = "registry_unavailable"


class UnsupportedManifest(RegistryError):
    """The manifest format is one this tool does not accept (e.g. schema 1)."""

    code = "unsupported_manifest"
    summary = "unsupported manifest"
    exit_code = 7
    http_status = 422


class DigestMismatch(HypemanError):
    """Content did not hash to the digest that named it."""

    code = "digest_mismatch"
    summary = "digest mismatch"
    exit_code = 8
    http_status = 502


class LayerError(HypemanError):
    """A layer is corrupt, inconsistent with the config, or hostile."""

    code = "bad_layer"
    summary = "bad layer"
    exit_code = 7
    http_status = 422


class DiskArtifactInvalid(HypemanError):
    """A disk artifact from a registry is malformed, inconsistent or hostile.

    The message says which check failed (docs/disk-artifacts.md lists them):
    its type, its subject, its chunk layout, a chunk that inflates past its
    declared size, the assembled disk's sha256, or ``e2fsck -fn``. Nothing of
    it is kept.
    """

    code = "invalid_disk_artifact"
    exit_code = 7
    http_status = 422
    summary = "bad disk artifact"


class LimitExceeded(HypemanError):
    """A configured safety limit (sizes, entry counts) was exceeded."""

    code = "limit_exceeded"
    summary = "safety limit exceeded"
    exit_code = 7
    http_status = 422


class ToolError(HypemanError):
    """An external tool (mke2fs, e2fsck, debugfs) is missing, too old or failed."""

    code = "tool_error"
    summary = "e2fsprogs missing or failing"
    exit_code = 9
    http_status = 500


class Conflict(HypemanError):
    """The request clashes with work in progress, e.g. deleting an image while it builds."""

    code = "conflict"
    summary = "conflict with a build in progress"
    exit_code = 1
    http_status = 409


class StorageError(HypemanError):
    """The data directory cannot be written: full disk, permissions, I/O errors."""

    code = "storage_error"
    summary = "data dir not writable or full"
    exit_code = 10
    http_status = 507


class CorruptDisk(HypemanError):
    """A built disk fails its check: ``e2fsck -fn``, or the sha256 recorded when it was built."""

    code = "corrupt_disk"
    summary = "disk fails verify"
    exit_code = 12
    http_status = 500


class ServiceError(HypemanError):
    """``serve`` cannot start: its address is taken or not usable on this host."""

    code = "service_error"
    summary = "cannot listen"
    exit_code = 13


class BootError(HypemanError):
    """The VM did not boot, or did not run the image's command to completion."""

    code = "boot_error"
    summary = "boot failed"
    exit_code = 11
    http_status = 500


EXIT_OK = 0
# 128 + SIGINT: the shell's convention for a process that Ctrl-C ended.
EXIT_INTERRUPTED = 130


def exit_codes() -> list[tuple[int, str]]:
    """The CLI's exit codes with what each means, in ascending order.

    Walks the classes of this module (the tree in its docstring; classes that
    other modules derive keep their parent's code, and the table does not
    depend on what was imported); a code that several classes share lists each
    class's ``summary`` once, in the tree's order. Success and
    Ctrl-C, which are no errors, complete the table. ``--help`` prints it, and
    the README's table can be generated or checked from it.
    """
    meanings: dict[int, list[str]] = {EXIT_OK: ["ok"], EXIT_INTERRUPTED: ["interrupted"]}

    def walk(cls: type[HypemanError]) -> None:
        summaries = meanings.setdefault(cls.exit_code, [])
        if cls.summary not in summaries:
            summaries.append(cls.summary)
        for sub in cls.__subclasses__():
            if sub.__module__ == __name__:
                walk(sub)

    walk(HypemanError)
    return [(code, ", ".join(meanings[code])) for code in sorted(meanings)]

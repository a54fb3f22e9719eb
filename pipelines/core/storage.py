"""Local paths and s3:// URLs behind one fsspec interface.

The S3 endpoint comes from $RAYBIND_S3_ENDPOINT (or $AWS_ENDPOINT_URL), so the same code talks to
AWS, MinIO or the moto server the tests start on 127.0.0.1.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

import fsspec

SUPPORTED_SCHEMES = ("", "file", "s3")


def s3_endpoint() -> str | None:
    return os.environ.get("RAYBIND_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")


def check_scheme(url: str) -> str:
    """Return the URL's scheme, or raise ValueError naming the URL if raybind cannot store there."""
    scheme = urlparse(str(url)).scheme
    if len(scheme) == 1:  # a Windows drive letter, not a scheme
        scheme = ""
    if scheme not in SUPPORTED_SCHEMES:
        raise ValueError(f"{url}: unsupported storage scheme {scheme!r}; use a local path or s3://bucket/prefix")
    return scheme


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for a local path or s3:// URL."""
    scheme = check_scheme(url)
    if scheme == "s3":
        endpoint = s3_endpoint()
        kwargs = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
        fs = fsspec.filesystem("s3", **kwargs)
        return fs, str(url)[len("s3://"):].rstrip("/")
    fs = fsspec.filesystem("file")
    path = str(url)[len("file://"):] if str(url).startswith("file://") else str(url)
    return fs, os.path.abspath(path)


def join(url: str, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *parts])


def pyarrow_filesystem(url: str):
    """A pyarrow filesystem for Ray Data readers (s3 via the same endpoint), or None for local paths."""
    if check_scheme(url) != "s3":
        return None
    import pyarrow.fs as pafs

    endpoint = s3_endpoint()
    if not endpoint:
        return pafs.S3FileSystem()
    parsed = urlparse(endpoint)
    return pafs.S3FileSystem(endpoint_override=parsed.netloc or endpoint, scheme=parsed.scheme or "https")


STORAGE_ENV_VARS = ("RAYBIND_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                    "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")


def worker_env() -> dict[str, str]:
    """Storage settings of this process, for Ray tasks' `runtime_env={"env_vars": ...}`.

    Ray workers inherit the environment of the moment the cluster started; an endpoint or credentials
    set later (a test's S3 server, a user's shell) reach them only this way."""
    return {k: os.environ[k] for k in STORAGE_ENV_VARS if k in os.environ}

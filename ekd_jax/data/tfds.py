"""TFDS datasets, for both the in-memory path and the stream: the builder of a ``tfds:<name>`` source,
prepared on first use (``download_and_prepare``: the internet and TensorFlow once), with its features
checked, and any failure of that first use as one ValueError line that names the cause and the fix
(``<where>: <cause>; <fix>``, which the command lines print as ``error: ...``).

TFDS is imported inside the functions only (importing TensorFlow takes seconds, and it is an extra:
``ekd_jax[tfds]`` / ``ekd_jax[stream]``).
"""

from __future__ import annotations

import errno
import os
import re
import socket
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

IMAGE_KEY, LABEL_KEY = "image", "label"
DOWNLOAD_PROBE_TIMEOUT_S = 15


def prepared_builder(name: str, data_dir: str | None, file_format: str | None = None):
    """``(builder, held-out split name)`` of TFDS dataset ``name`` under ``data_dir``, prepared, with an
    ``image`` feature and a ``ClassLabel`` ``label``. ``file_format`` is the format the caller reads (the
    stream's 'array_record'; None = TFDS's default, tfrecord). Every problem is a ValueError of one line."""
    import tensorflow_datasets as tfds

    where = f"data.source='tfds:{name}'"
    try:
        kwargs = {} if file_format is None else {"file_format": file_format}
        builder = tfds.builder(name, data_dir=data_dir, **kwargs)
    except tfds.core.registered.DatasetNotFoundError as e:
        # TFDS's own message lists every dataset it knows; a pointer to the catalog reads better.
        raise ValueError(
            f"{where}: TFDS has no dataset {name!r}; see "
            "https://www.tensorflow.org/datasets/catalog (e.g. 'cifar100', "
            "'imagenet_resized/32x32', with an optional ':<version>')."
        ) from e
    prepare(builder, name, where, file_format)
    features = builder.info.features
    if IMAGE_KEY not in features or LABEL_KEY not in features:
        raise ValueError(f"{where}: needs 'image' and 'label' features, the dataset has {sorted(features)}.")
    label = features[LABEL_KEY]
    if not isinstance(label, tfds.features.ClassLabel):
        raise ValueError(f"{where}: 'label' is a {type(label).__name__}, not a ClassLabel.")
    return builder, _held_out_split(builder.info.splits, where)


def _held_out_split(splits, where: str) -> str:
    """The held-out split of a dataset with ``splits``: 'test', else 'validation'."""
    # Some datasets (imagenet_resized) publish their held-out labels as 'validation' only.
    # An empty split dict (metadata not written yet, or mocked) means: trust 'test'.
    if not splits or "test" in splits:
        return "test"
    if "validation" in splits:
        return "validation"
    raise ValueError(f"{where}: has no 'test' or 'validation' split, only {sorted(splits)}.")


def prepare(builder, name: str, where: str, file_format: str | None = None) -> None:
    """``builder.download_and_prepare()`` (nothing to do once prepared); any failure becomes a ValueError of
    one line, ``<where>: <cause>; <fix>``, which the command lines print as ``error: ...``. ``file_format``
    is the format the caller reads (the stream's 'array_record'), for the fix's `tfds build` command."""
    import tensorflow_datasets as tfds

    # TFDS draws its download and extraction bars on stderr. Like the training bar (train.py), only on a
    # terminal: in a log or a pipe they are lines of noise, around the one error line of a failed first use.
    if not sys.stderr.isatty():
        tfds.disable_progress_bar()
    try:
        # (Not builder.is_prepared(): it logs a warning for the folder a failed first use leaves behind.)
        # A dataset TFDS cannot download itself (imagenet2012) is left to TFDS, which names the files it needs.
        if not (os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))
                or getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)):
            check_hosts_reachable(builder)
        builder.download_and_prepare()
    except Exception as e:  # noqa: BLE001  (TFDS raises whatever its download, extraction or writing hit)
        raise ValueError(f"{where}: {failure(e, builder, name, file_format)}") from e


def check_hosts_reachable(builder) -> None:
    """Opens one connection to each host (or its proxy) that a download still missing from TFDS's download
    folder needs, and lets a failure through, to be named like the downloader's own. TFDS's downloader
    retries a refused or unresolvable connection ten times with a doubling pause (3.5 minutes in all,
    logging each retry); an offline first use should say so at once."""
    from tensorflow_datasets.core.download import resource

    downloads = os.path.join(builder.data_dir_root, "downloads")
    # A finished download, or the file put in TFDS's manual folder (which TFDS takes instead of downloading).
    missing = [url for url, info in (builder.url_infos or {}).items()
               if not os.path.exists(os.path.join(downloads, builder.name, resource.get_dl_fname(url, info.checksum)))
               and not os.path.exists(os.path.join(downloads, "manual", info.filename or os.path.basename(url)))]
    proxies = urllib.request.getproxies()
    for url in missing:
        target = urllib.parse.urlparse(url)
        proxy = proxies.get(target.scheme)
        via = urllib.parse.urlparse(proxy if "://" in str(proxy) else f"http://{proxy}") if proxy else None
        if via is not None and not urllib.request.proxy_bypass(target.hostname):
            host, port = via.hostname, via.port or 80
        else:
            via, host, port = None, target.hostname, target.port or (443 if target.scheme == "https" else 80)
        try:
            socket.create_connection((host, port), timeout=DOWNLOAD_PROBE_TIMEOUT_S).close()
        except OSError as e:
            raise _Unreachable(target.hostname, via is not None) from e


class _Unreachable(ConnectionError):
    """A download host (or the proxy to it) that :func:`check_hosts_reachable` could not connect to."""

    def __init__(self, host: str, proxy: bool):
        super().__init__(f"{host} cannot be reached" + (" through the proxy of HTTPS_PROXY / HTTP_PROXY" if proxy else ""))
        self.host, self.proxy = host, proxy


def failure(e: BaseException, builder, name: str, file_format: str | None = None) -> str:
    """``<cause>; <fix>`` of a failed preparation of TFDS dataset ``name``, on one line.

    The cause is looked for along the whole exception chain: TFDS lets the downloader's exception through
    (requests wrapping urllib3 wrapping the socket's), so the outermost one rarely names the cause.
    """
    chain = _exception_chain(e)
    build = f"`tfds build {name}" + (f" --file_format={file_format}`" if file_format else "`")
    elsewhere = (f"prepare it on a machine with internet ({build}, or this same run) and copy that TFDS folder "
                 "(~/tensorflow_datasets unless a data_dir was given) here as --config.data.tfds_data_dir")
    # NonMatchingChecksumError is not exported by TFDS (it lives in core.download.download_manager).
    checksum = next((x for x in chain if type(x).__name__ == "NonMatchingChecksumError"), None)
    if checksum is not None:
        found = re.search(r"Artifact (\S+), downloaded to (\S+), has wrong checksum", str(checksum))
        url, path = found.groups() if found else ("its download", "the downloaded file")
        return (f"{path} is not the file TFDS expects for {url} (checksum mismatch: an interrupted or altered "
                f"download, or a host that changed the file); delete it and run again to download it afresh, "
                f"or {elsewhere}")
    full = next((x for x in chain if _disk_full(x)), None)
    if full is not None:
        return (f"not enough free disk space in {builder.data_dir_root} ({_one_line(full)}); free some space "
                "there or give a folder on a disk with room as --config.data.tfds_data_dir")
    unreachable = _unreachable(chain)
    if unreachable is not None:
        return (f"{unreachable}; the first use of a TFDS dataset downloads it once, which needs the internet: "
                f"connect this machine once and run again, or {elsewhere}, or train on "
                "data.source='npz:<path>' or 'digits'")
    manual = next((x for x in chain if isinstance(x, AssertionError) and "Manual directory" in str(x)), None)
    if manual is not None:  # imagenet2012 and the other datasets TFDS may not download itself
        return (f"TFDS cannot download this dataset itself ({_one_line(manual, limit=600)}); "
                "put the files there and run again")
    # Last: a module missing deep in the chain of another failure is not its cause.
    missing = next((x for x in chain if isinstance(x, ModuleNotFoundError)), None)
    if missing is not None:
        return (f"TFDS needs the Python module {missing.name!r} to prepare a dataset, and it is not installed; "
                "pip install 'ekd_jax[tfds]' (TFDS, TensorFlow and the modules they need to prepare one)")
    return (f"TFDS could not prepare it in {builder.data_dir} ({_one_line(e, limit=500)}); fix that and run again (a "
            "prepared dataset is reused), or train on data.source='npz:<path>' or 'digits'")


def _exception_chain(e: BaseException) -> list[BaseException]:
    """``e`` and every exception behind it: causes, contexts, and those that requests and urllib3
    keep in ``args`` or ``reason`` instead of chaining them."""
    out, todo, seen = [], [e], set()
    while todo:
        x = todo.pop(0)
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        out.append(x)
        todo += [x.__cause__, x.__context__, getattr(x, "reason", None), *x.args]
    return out


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # TFDS checks the space it needs before it starts (a bare IOError); TensorFlow's file layer keeps
    # only the operating system's text.
    return str(e).startswith("Not enough disk space") or "No space left on device" in str(e)


def _unreachable(chain: list[BaseException]) -> str | None:
    """'<host> cannot be reached ...' when the chain holds a failure to connect, else None."""
    kinds = [socket.gaierror, ConnectionError, TimeoutError, urllib.error.URLError]
    # TFDS downloads with requests over urllib3: its dependencies, not ours, so they are not imported
    # here, only looked up (a module that raised is imported).
    if (requests := sys.modules.get("requests")) is not None:
        kinds += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    urllib3 = sys.modules.get("urllib3")
    if urllib3 is not None:
        kinds += [urllib3.exceptions.NewConnectionError, urllib3.exceptions.ProxyError]
    # A certificate problem is a requests ConnectionError too, but the host was reached.
    failed = [x for x in chain if isinstance(x, tuple(kinds))]
    if not failed or any(isinstance(x, ssl.SSLError) for x in chain):
        return None
    probe = next((x for x in chain if isinstance(x, _Unreachable)), None)
    url = next((x.request.url for x in chain if getattr(getattr(x, "request", None), "url", None)), "")
    host = probe.host if probe else urllib.parse.urlparse(url).hostname or "the download host"
    proxy = probe.proxy if probe else urllib3 is not None and any(isinstance(x, urllib3.exceptions.ProxyError) for x in chain)
    via = " through the proxy of HTTPS_PROXY / HTTP_PROXY" if proxy else ""
    return f"{host} cannot be reached{via} to download it (no internet? {_one_line(failed[-1])})"


def _one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (whitespace collapsed), cut at ``limit`` characters."""
    text = " ".join(str(e).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__

"""Reading one shard so that its damage costs its samples, never the run.

Among thousands of shards one will be missing, truncated, empty, not a tar, unreadable (a
directory in its place, permissions, an I/O error) or fed by a ``pipe:`` command that fails. The
training stream (``stream.py``), the evaluation stream (``eval_stream.py``) and the counting of
shards without a manifest all read shards through :func:`read_shard`, which turns each of these
into a problem of that shard, reported once, instead of an exception. Every sample index the
caller asked for is still yielded exactly once, the lost ones as a :class:`BadImage` of the
shard's kind, so the caller counts them as bad samples and refills them as it does any bad sample
(the training stream keeps equal per-rank lengths and exact resume that way).

Kinds, each counted per lost sample:

- ``missing_shard``: the shard file does not exist (a local path or ``file:`` URL).
- ``unreadable_shard``: nothing can be read from it: a directory or a file without read
  permission, an I/O error, an empty file, bytes that are not a tar (compressed or not), a
  ``pipe:`` / URL command that fails before the first sample.
- ``truncated_shard``: it breaks after at least one sample (cut short, an I/O error or a failing
  command part-way): the samples before the break are used, the one in progress and all after
  are counted. (A gzip/bz2/xz-compressed *tar* under a ``.tar`` name is read like a plain one,
  as webdataset does: its samples are all there.)
- ``missing``: the tar ends cleanly but with fewer samples than the manifest promises.

Which samples are lost is a function of the shard's bytes only (not of which samples a reader
wanted, nor of where it started), so a resumed run loses the very same ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from webdataset import gopen

from .augment import BadImage
from .keys import DEFAULT_KEYS, SampleKeys
from .tario import UnsafeSample, iter_tar_samples

__all__ = ["ShardProblem", "read_shard", "count_shard", "warn_shard_once", "image_and_label",
           "SHARD_KINDS"]

log = logging.getLogger(__name__)

SHARD_KINDS = ("missing_shard", "unreadable_shard", "truncated_shard", "missing")

Members = dict[str, bytes] | BadImage | None


@dataclass(frozen=True)
class ShardProblem:
    """What went wrong with one shard: its URL, kind, the error, and the first lost sample."""

    url: str
    kind: str
    reason: str
    first_lost: int


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_shard(
    url: str,
    want: Callable[[int], bool] | None = None,
    stop: int | None = None,
    on_problem: Callable[[ShardProblem], None] | None = None,
) -> Iterator[tuple[int, str | None, Members]]:
    """``(index, key, members)`` for samples ``0..stop-1`` of the shard at ``url``, each index
    once and in order, whatever state the shard is in.

    ``members`` is the sample's ``{ext: bytes}`` when ``want(index)`` (an :class:`UnsafeSample`
    when it has an unsafe member), ``None`` when not wanted, and a :class:`BadImage` of the
    shard's kind (with key ``None``) for a wanted sample the shard could not give. With
    ``stop=None`` nothing was promised: reading ends where the shard ends or breaks.
    ``on_problem`` is called once if the shard is damaged (see the module docstring).
    """
    got = 0  # samples yielded from the tar itself
    problem: tuple[str, str] | None = None
    try:
        f = gopen(url, "rb")
    except FileNotFoundError as e:
        problem = ("missing_shard", _describe(e))
    except MemoryError:
        raise
    except Exception as e:  # a directory, permissions, a bad URL: this shard only
        problem = ("unreadable_shard", _describe(e))
    else:
        try:
            for i, key, members in iter_tar_samples(f, want=want, stop=stop):
                got = i + 1
                yield i, key, members
        except MemoryError:
            raise
        except Exception as e:  # tarfile, gzip, zlib, lzma, OSError... anything reading bytes
            problem = ("truncated_shard" if got else "unreadable_shard", _describe(e))
        finally:
            try:
                f.close()  # a pipe: reports its command's exit status here
            except Exception as e:
                # a command that failed before giving every sample asked for lost the rest;
                # one stopped early because we had what we needed (SIGPIPE) lost nothing
                if problem is None and (stop is None or got < stop):
                    problem = ("truncated_shard" if got else "unreadable_shard", _describe(e))
    if problem is None and stop is not None and got < stop:
        problem = ("missing", f"the shard ends after {got} samples, fewer than its manifest says")
    if problem is None:
        return
    kind, reason = problem
    if on_problem is not None:
        on_problem(ShardProblem(url, kind, reason, got))
    for i in range(got, stop if stop is not None else got):
        yield i, None, (BadImage(kind, reason) if want is None or want(i) else None)


def count_shard(url: str) -> tuple[int, ShardProblem | None]:
    """Samples readable from the start of a shard (reading no member data), and its problem.

    A shard that breaks part-way counts the samples before the break: a stream told that count
    stops before the damage, so its good samples are still used.
    """
    problems: list[ShardProblem] = []
    n = sum(1 for _ in read_shard(url, want=lambda i: False, on_problem=problems.append))
    return n, (problems[0] if problems else None)


_warned: set[tuple[str, str]] = set()  # (url, kind) already logged by this process


def warn_shard_once(problem: ShardProblem, what: str = "") -> None:
    """One warning line per shard and kind per process (workers hand their problems to the
    main process with their batches, so the line is not repeated by every worker)."""
    if (problem.url, problem.kind) in _warned:
        return
    _warned.add((problem.url, problem.kind))
    from_ = f"from sample {problem.first_lost} on " if problem.first_lost else ""
    log.warning("skipping shard %s (%s): %s; its samples %sare counted as bad (%s)%s",
                problem.url, problem.kind, problem.reason, from_, problem.kind, what)


def image_and_label(members: Members, keys: SampleKeys = DEFAULT_KEYS) -> tuple[bytes, int]:
    """A sample's image bytes and integer label (-1 when unlabelled: see ``keys.py``); BadImage
    when the sample is lost with its shard, has an unsafe member, no image member of ``keys``,
    or a label that is not an integer."""
    if isinstance(members, BadImage):
        raise BadImage(members.kind, members.reason)  # a fresh one: each raise its own traceback
    if members is None:
        raise BadImage("missing", "shard has fewer samples than its manifest says")
    if isinstance(members, UnsafeSample):
        raise BadImage("unsafe_member", members.reason)
    data = keys.image(members)
    if data is None:
        raise BadImage("no_image", f"no image member {keys.image_key!r} (has {sorted(members)})")
    return data, keys.label(members)

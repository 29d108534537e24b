"""`mae-scale <verb>`: parse, call, map errors to exit codes. The verbs' parsers are grouped by what
they work on (`train.py`, `data.py`, `tools.py`, `tokenizer.py`); their work lives in the library.

Bad input ends with one line on stderr (`error: ...`) and exit status 2, before any work starts;
the statuses are decided in `mae_scale.errors`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from launchers.slurm import add_status_parser, add_submit_parser
    from mae_scale.cli.data import add_data_parsers, add_make_shards_parser
    from mae_scale.cli.tokenizer import add_tokenizer_parser
    from mae_scale.cli.tools import add_bench_parser, add_config_parser, add_export_parser
    from mae_scale.cli.train import add_train_parsers
    from mae_scale.tools.plan import add_plan_parser
    from mae_scale.cli_args import OneLineParser  # every verb's argparse errors: one line, status 2

    parser = OneLineParser(prog="mae-scale", description="MAE pretraining at scale on DeepSpeed ZeRO.")
    # The `deepspeed` launcher puts --local_rank before the verb; LOCAL_RANK in the env is what counts.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    verbs = parser.add_subparsers(dest="verb", required=True)
    add_train_parsers(verbs)  # in the order `mae-scale --help` lists them
    add_make_shards_parser(verbs)
    add_bench_parser(verbs)
    add_data_parsers(verbs)
    add_config_parser(verbs)
    add_export_parser(verbs)
    add_plan_parser(verbs)
    add_tokenizer_parser(verbs)
    add_submit_parser(verbs)
    add_status_parser(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mae_scale.errors import report

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as exc:
        code = report(exc)  # an error a user can act on: one line, its status
        if code is None:
            raise
        return code


def report_crash(exc: BaseException) -> int:
    """A failure nothing anticipated: one line naming it and the file that holds its traceback
    (`MAE_SCALE_TRACEBACK=1` prints the traceback instead, as the tests do); status 1."""
    import os
    import tempfile
    import time
    import traceback

    text = "".join(traceback.format_exception(exc))
    path = Path(tempfile.gettempdir()) / f"mae-scale-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    if not os.environ.get("MAE_SCALE_TRACEBACK"):
        try:
            path.write_text(text)
        except OSError:
            path = None
    if os.environ.get("MAE_SCALE_TRACEBACK") or path is None:
        print(text, file=sys.stderr, end="", flush=True)
        return 1
    what = (str(exc).strip().splitlines() or [""])[0][:300]
    print(f"error: unexpected {type(exc).__name__}: {what} (the traceback is in {path}; please report it with the "
          "command that ran)", file=sys.stderr, flush=True)
    return 1


def entry() -> None:
    """The `mae-scale` console script and `python -m mae_scale`: `main`, then the exit.

    A run that started a process group leaves through `exit_process` (no interpreter
    finalization, where gloo's threads can abort a finished run); a crash ends in one line
    (`report_crash`, status 1) on every path; `main` itself returns normally for callers in-process
    (the SLURM job)."""
    def in_process_group() -> bool:
        distributed = sys.modules.get("mae_scale.distributed")  # imported only by verbs that may start one
        return distributed is not None and distributed.process_group_started()

    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which stops itself at a step boundary)
        print("error: interrupted", file=sys.stderr, flush=True)
        code = 130
    except Exception as exc:
        code = report_crash(exc)
    if in_process_group():
        sys.modules["mae_scale.distributed"].exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()

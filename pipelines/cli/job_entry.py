"""Entry point of a submitted Ray Job: `python -m pipelines.cli.job_entry PIPELINE ...` = the `raybind` CLI,
then a hard exit.

Why the hard exit: at interpreter teardown, finalisers of Ray handles (the reader's ReadStats actor
handle) call into Ray after `ray.shutdown()`; Ray auto-initialises again from $RAY_ADDRESS and the
driver hangs in a thread start during finalisation, so the job never leaves RUNNING (seen with
Ray 2.60 on a nightly job). Everything worth keeping has been written and flushed by then.
"""

from __future__ import annotations

import os
import sys
import traceback

from pipelines.cli.main import main as cli_main


def main() -> None:
    try:
        code = cli_main(sys.argv[1:])
    except SystemExit as exc:  # argparse errors
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()

"""Runs several ``vllm bench serve`` command lines in one process (run with vLLM's python).

Each argument list is parsed by ``vllm bench serve``'s own parser and run by its own ``main``, exactly
as ``vllm bench serve ARGS`` would; importing vLLM once instead of once per concurrency level saves
about 15 s of start-up per run on a 2-core machine. Results go where ``--result-dir`` and
``--result-filename`` say.

    python vllm_bench_driver.py '[["--backend", "openai-chat", ...], [...]]'
"""

import json
import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser


def run(command_lines: list[list[str]]) -> None:
    for argv in command_lines:
        parser = FlexibleArgumentParser(prog="vllm bench serve")
        add_cli_args(parser)
        args = parser.parse_args(argv)
        print("$ vllm bench serve " + " ".join(argv), flush=True)
        main(args)


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))

"""Command line of the standalone ``bench_cpu_*.py`` scripts: one optional count (repetitions or
steps), on/off flags and ``--threads``. ``--help`` prints the script's docstring and its arguments;
an unknown argument stops the script with argparse's message instead of starting a long run."""
import argparse


def parse(doc, count=None, flags=(), threads=None):
    """``count``: (name, default) of the positional integer; ``flags``: (flag, help) pairs;
    ``threads``: the default of ``--threads`` (None: the script has no such option)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if count is not None:
        name, default = count
        parser.add_argument(name, type=int, nargs="?", default=default, help=f"default {default}")
    for flag, text in flags:
        parser.add_argument(flag, action="store_true", help=text)
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads, help=f"torch CPU threads (default {threads})")
    return parser.parse_args()

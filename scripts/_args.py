"""Argument types shared by the scripts (each script puts scripts/ on sys.path)."""
import argparse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser, dtype: str = "uint8") -> None:
    """-m, --dtype, --tokenizer, -t: the model a benchmark loads."""
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--dtype", default=dtype)
    p.add_argument("--tokenizer")
    p.add_argument("-t", "--threads", type=int)


def cpu_name() -> str:
    """The CPU's model name, as benchmarks print it beside their figures."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"

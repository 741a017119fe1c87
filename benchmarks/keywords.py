"""Benchmark: spoken keywords, personalized for accents the GE never heard.

    python benchmarks/keywords.py [--users 16] [--epochs 30] [--out benchmarks/results/keywords]

Needs espeak-ng and flite (apt-get install espeak-ng flite); nothing is
downloaded. It runs the keyword demo's loop (``edgetailor/app/keywords.py``)
at full size:

1. **Generic data.** The digits "zero" to "nine", synthesized by espeak-ng's
   English dialects and voice variants at two rates and two pitches, each
   clip in a room of its own (``toolkit/speech.py``). A quarter of the
   speakers are held out as the generic test set.
2. **GE.** A DS-CNN keyword spotter that begins with edgetailor's log-mel
   front-end. It is trained by a plain torch loop, as its owner would, and
   brought in through ``bundle_from_model`` with automatic taps.
3. **Accent users.** Voices the generic set lacks:
   - espeak-ng's other languages reading the English words;
   - flite's voices.

   Each user gives 10 samples per word (100 in all) and is tested on 10
   more.
4. **Per user.** Personalization runs in a fresh `edgetailor device
   personalize` process, on ``ort``, from a folder of WAV files, as a phone
   would.
   - Accuracy is measured with GE alone and with GE+LE+GN, on the user's
     test set and on the held-out generic speakers.
   - The baselines fine-tune all of GE, or its last layer, on the same
     samples.
   - Costs are the whole process's time, the time in LE's and GN's steps,
     and the peak RSS.

Prints the table and the targets; writes OUT/keywords.json (and the demo's
report.json and report.png in OUT/run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=16, help="accent users (12 espeak-ng languages, 4 flite voices)")
    parser.add_argument("--epochs", type=int, default=30, help="GE's training epochs")
    parser.add_argument("--formats", default="onnx", help="formats the bundle carries (the users run on ort)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "keywords")
    args = parser.parse_args()

    from edgetailor.app.keywords import run_keyword_demo
    from edgetailor.toolkit.speech import synthesizers_missing

    why = synthesizers_missing()
    if why:
        sys.exit(f"cannot run: {why}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = run_keyword_demo(args.out / "run", n_users=args.users, samples_per_word=10, epochs=args.epochs,
                              seed=args.seed, formats=tuple(args.formats.split(",")))
    mean, rows = report["mean"], report["users"]
    reference = mean["FT all user"] - mean["GE user"]
    targets = {
        "gain, share of the way from GE to FT all (>= 0.75)":
            (mean["GE+LE+GN user"] - mean["GE user"]) / reference if reference > 0 else None,
        "generic accuracy change, points (>= -0.5)": 100 * (mean["GE+LE+GN generic"] - mean["GE generic"]),
        "LE+GN share of GE's parameters, % (<= 2.5)": report["overhead"]["params_pct"],
        "device process for 100 samples, s, median (<= 0.6)": statistics.median(r["device process s"] for r in rows),
        "LE+GN training steps, s, median (<= 0.1)": statistics.median(r["train s"] for r in rows),
        "peak RSS, MB, largest (<= 100)": max(r["peak RSS MB"] for r in rows),
    }
    print("\ntargets")
    for what, value in targets.items():
        print(f"  {what}: {value:.3f}" if value is not None else f"  {what}: n/a")
    (args.out / "keywords.json").write_text(json.dumps({"report": report, "targets": targets}, indent=2) + "\n")
    print(f"wrote {args.out / 'keywords.json'}")


if __name__ == "__main__":
    main()

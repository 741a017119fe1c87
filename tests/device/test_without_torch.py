"""The device side must import and personalize with torch not importable."""

import json
import subprocess
import sys
import textwrap

from tests.conftest import ROOT


def test_personalize_with_torch_unimportable(bundle_dir, user, tmp_path):
    from edgetailor.toolkit.loaders import save_npz

    save_npz(user.train, tmp_path / "train.npz")
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from edgetailor.device import DeviceRuntime
        from edgetailor.toolkit.loaders import load_samples
        with DeviceRuntime.open({str(bundle_dir)!r}, {str(tmp_path / 'state')!r}) as rt:
            rt.add_dataset(load_samples({str(tmp_path / 'train.npz')!r}))
            report = rt.personalize()
            accuracy = rt.evaluate_dataset(load_samples({str(tmp_path / 'train.npz')!r}))["accuracy"]
        heavy = [m for m, mod in sys.modules.items()
                 if mod is not None and m.split(".")[0] in ("torch", "sklearn", "matplotlib")]
        print(json.dumps({{"steps": report["le_steps"], "accuracy": accuracy, "heavy": heavy}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] > 0 and result["accuracy"] > 0.9
    assert result["heavy"] == []

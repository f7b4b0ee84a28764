"""The committed stubs in baton/v1 are what protos/ generates (`make protos`)."""

import subprocess
import sys
from pathlib import Path

from baton.protogen import REPO_ROOT


def test_generated_stubs_are_current(tmp_path: Path):
    # As `make protos` runs it: its own process (protoc's C++ runtime and
    # NIXL's, loaded by other tests, do not share one process).
    subprocess.run([sys.executable, "-m", "baton.protogen", str(tmp_path)], check=True, cwd=REPO_ROOT)
    fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / "baton" / "v1").iterdir() if p.is_file())
    committed = REPO_ROOT / "baton" / "v1"
    assert fresh == sorted(p.relative_to(REPO_ROOT) for p in committed.iterdir() if p.is_file()
                           and p.suffix in (".py", ".pyi"))
    stale = [str(p) for p in fresh if (tmp_path / p).read_bytes() != (REPO_ROOT / p).read_bytes()]
    assert not stale, f"run `make protos`: stale stubs {stale}"

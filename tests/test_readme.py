"""The README's two commands are the contract with a new user; CI must run exactly the second."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_opens_with_train_and_test_commands():
    train_cmd, test_cmd = _bash_blocks()[:2]
    assert "jaxlm train experiments/shakespeare.py" in train_cmd
    assert (ROOT / "experiments" / "shakespeare.py").is_file()
    assert "pytest" in test_cmd


def test_ci_runs_exactly_the_readme_test_command():
    test_cmd = _bash_blocks()[1].strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines, f"{test_cmd!r} is not a line of .ci/run"

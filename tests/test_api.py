"""The library API as docs/api.md shows it: its examples run as written."""

import re

import torch

import locallearn
from locallearn.config import PROJECT_ROOT


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (PROJECT_ROOT / "docs" / "api.md").read_text(), re.S)


def test_the_ten_line_example_trains_two_chunks_locally(capsys):
    code = blocks()[0]
    assert len([line for line in code.splitlines() if line.strip()]) <= 12
    scope = {}
    exec(compile(code, "docs/api.md", "exec"), scope)
    net, losses = scope["net"], scope["losses"]
    assert len(losses) == 2 and all(torch.isfinite(loss) for loss in losses)
    assert re.fullmatch(r"\[[\d.]+, [\d.]+\]\n", capsys.readouterr().out)
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)  # every chunk was trained


def test_the_one_call_example_trains_a_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its outputs go under the working directory
    monkeypatch.delenv("LOCALLEARN_LOGS", raising=False)
    code = blocks()[1].replace("trainer.max_steps=50", "trainer.max_steps=4\", \"trainer.val_check_interval=2\", "
                               "\"data.n_train_tokens=20000\", \"data.n_val_tokens=4000\", \"trainer.accelerator=cpu")
    scope = {}
    exec(compile(code, "docs/api.md", "exec"), scope)
    assert set(scope["summary"]["val_loss"]) == {"chunk1", "chunk2"}
    (run_dir,) = (tmp_path / "logs" / "runs").iterdir()
    assert run_dir.name.endswith("_api") and (run_dir / "summary.json").is_file()


def test_every_api_name_is_exported():
    assert set(locallearn.api.__all__) == locallearn._API
    assert all(getattr(locallearn, name) is getattr(locallearn.api, name) for name in locallearn._API)

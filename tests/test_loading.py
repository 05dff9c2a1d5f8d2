"""Loading teachers from local files: safetensors, weights-only state_dicts, refusals."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kd.models import digits_student, digits_teacher
from kd.teacher_server.loading import TeacherLoadError, TeacherSpec, build_model, fingerprint, load_teacher


class NotWeights:
    """Anything that is not a tensor: unpickling it would run code (here: create ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_safetensors_and_state_dict_give_the_same_teacher(tmp_path: Path, teacher_weights: Path) -> None:
    a = load_teacher("a", f"kd.models:digits_teacher@{teacher_weights}")
    model = digits_teacher()
    a_state = a.model.state_dict()
    torch.save(a_state, tmp_path / "w.pt")
    b = load_teacher("b", f"kd.models:digits_teacher@{tmp_path / 'w.pt'}")
    torch.save({"state_dict": a_state, "epoch": 3}, tmp_path / "ckpt.pth")
    c = load_teacher("c", f"kd.models:digits_teacher@{tmp_path / 'ckpt.pth'}")
    assert a.fingerprint == b.fingerprint == c.fingerprint
    assert a.fingerprint != fingerprint(model), "fingerprint must depend on the weights"
    assert not a.model.training and a.num_classes == 10 and a.input_shape == (64,)
    x = torch.rand(3, 64)
    with torch.inference_mode():
        torch.testing.assert_close(a.model(x), b.model(x))


def test_fingerprint_depends_on_architecture_and_every_weight(teacher_weights: Path) -> None:
    t = load_teacher("t", f"kd.models:digits_teacher@{teacher_weights}")
    before = t.fingerprint
    with torch.no_grad():
        next(iter(t.model.parameters())).view(-1)[0] += 1e-6
    assert fingerprint(t.model) != before
    assert fingerprint(digits_student()) != fingerprint(digits_teacher())


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    marker = tmp_path / "payload-ran"
    with open(path, "wb") as f:
        pickle.dump({"w": NotWeights(marker)}, f)
    torch.save({"model": NotWeights(marker)}, tmp_path / "evil2.pt")
    causes = {path: "(Unsupported operand 149)", tmp_path / "evil2.pt": "(Unsupported global: GLOBAL io.open was not"}
    for p, cause in causes.items():
        with pytest.raises(TeacherLoadError, match="not plain weights|cannot read") as e:
            load_teacher("t", f"kd.models:digits_teacher@{p}")
        assert not marker.exists(), f"loading {p.name} ran its pickled payload"
        # One line naming what was refused: torch's ~7 lines of advice (weights_only=False "will likely
        # succeed", allowlisting the global, terminal escapes) were printed under kd's error line
        text = str(e.value)
        assert cause in text and "\n" not in text and "\x1b" not in text, text
        assert "weights_only` set to `False`" not in text and "add_safe_globals" not in text, text
    # Control: the same payload does run when unpickled plainly, so the check above can fail.
    pickle.loads(pickle.dumps(NotWeights(tmp_path / "control")))
    assert (tmp_path / "control").exists()


def test_missing_file_and_mismatched_checkpoint_are_clear(tmp_path: Path) -> None:
    with pytest.raises(TeacherLoadError, match="does not exist"):
        load_teacher("t", f"kd.models:digits_teacher@{tmp_path / 'nope.safetensors'}")
    save_file({k: v.contiguous() for k, v in digits_student().state_dict().items()}, str(tmp_path / "s.safetensors"))
    with pytest.raises(TeacherLoadError, match="does not fit the architecture"):
        load_teacher("t", f"kd.models:digits_teacher@{tmp_path / 's.safetensors'}")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TeacherLoadError, match="not a valid safetensors"):
        load_teacher("t", f"kd.models:digits_teacher@{tmp_path / 'junk.safetensors'}")
    with pytest.raises(TeacherLoadError, match="cannot import module"):
        load_teacher("t", "no_such_module_kd:factory")
    with pytest.raises(TeacherLoadError, match="no attribute"):
        load_teacher("t", "kd.models:no_such_factory")


def test_export_archive_needs_trust(tmp_path: Path) -> None:
    model = digits_teacher().eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.rand(4, 64),), dynamic_shapes=({0: batch},))
    path = tmp_path / "teacher.pt2"
    torch.export.save(program, str(path))
    with pytest.raises(TeacherLoadError, match="--trust-archive"):
        load_teacher("t", f"{path}?input_shape=64")
    t = load_teacher("t", f"{path}?input_shape=64", trust_archive=True)
    assert t.num_classes == 10 and t.input_shape == (64,)
    x = torch.rand(5, 64)
    with torch.inference_mode():
        torch.testing.assert_close(t.model(x), model(x))


def test_spec_parsing() -> None:
    s = TeacherSpec.parse("pkg.mod:make_net@/w/x.safetensors?input_shape=3x32x32")
    assert s.factory == "pkg.mod:make_net" and str(s.weights) == "/w/x.safetensors" and s.input_shape == (3, 32, 32)
    assert TeacherSpec.parse("/models/t.pt2").archive == Path("/models/t.pt2")
    # Other options are the factory's keyword arguments; one it does not take is refused when built.
    assert dict(TeacherSpec.parse("a:b@w.pt?colour=red").kwargs) == {"colour": "red"}
    with pytest.raises(TeacherLoadError, match="refused the arguments"):
        build_model(TeacherSpec.parse("kd.models:digits_student?colour=red"))


class _Output:
    """What a Hugging Face model returns: an object whose ``.logits`` is the tensor."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class HFStyleTeacher(torch.nn.Module):
    input_shape = (64,)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> _Output:
        return _Output(self.body(x))


def test_a_teacher_returning_an_output_object_is_served_by_its_logits() -> None:
    """Hugging Face-style outputs are unwrapped to ``.logits`` by the probe, the runner and the VJP."""
    from kd.teacher_server.runner import ModelRunner

    teacher = load_teacher("hf", "test_loading:HFStyleTeacher")
    assert teacher.num_classes == 10
    x = torch.rand(5, 64)
    expected = teacher.model.body(x)
    torch.testing.assert_close(ModelRunner(teacher)(x), expected)

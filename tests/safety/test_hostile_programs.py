"""A .pt2 from elsewhere never runs code: fgvc.export.load_program refuses every pickled payload."""
import io
import json
import os
import zipfile

import pytest
import torch

from fgvc.export import load_program
from sparse_mim.utils.checkpoint import CheckpointError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Payload:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("offset", torch.ones(2))

    def forward(self, x):
        return self.lin(x) + self.offset


def _program_bytes() -> bytes:
    ep = torch.export.export(_Tiny().eval(), (torch.randn(2, 3),))
    buf = io.BytesIO()
    torch.export.save(ep, buf, extra_files={"fgvc.json": json.dumps({"classes": ["a", "b"]})})
    return buf.getvalue()


def _rewrite(data: bytes, change) -> bytes:
    """A copy of the archive with ``change(name, bytes) -> bytes | None`` applied (None drops it)."""
    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            new = change(info.filename, src.read(info))
            if new is not None:
                dst.writestr(info.filename, new)
    return out.getvalue()


def _pickled(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _use_pickle_weight(marker):
    def change(name, body):
        if name.endswith("model_weights_config.json"):
            cfg = json.loads(body)
            cfg["config"]["lin.weight"]["use_pickle"] = True
            return json.dumps(cfg).encode()
        if name.endswith("data/weights/" + "weight_0"):
            return _pickled(_Payload(marker))
        return body
    return change


def _hostile_sample_inputs(marker):
    def change(name, body):
        return _pickled(((_Payload(marker),), {})) if "/sample_inputs/" in name else body
    return change


def _opaque_constant(marker):
    def change(name, body):
        if name.endswith("model_constants_config.json"):
            cfg = json.loads(body)
            cfg["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                     "tensor_meta": None}
            return json.dumps(cfg).encode()
        return body
    return change


def test_a_genuine_program_loads_and_runs(tmp_path):
    path = tmp_path / "ok.pt2"
    path.write_bytes(_program_bytes())
    module, meta = load_program(str(path))
    assert meta == {"classes": ["a", "b"]}
    x = torch.randn(2, 3)
    ref = _Tiny()
    ref.load_state_dict(dict(module.state_dict()))
    torch.testing.assert_close(module(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("craft,what", [(_use_pickle_weight, "pickled payload"),
                                        (_hostile_sample_inputs, "sample inputs"),
                                        (_opaque_constant, "pickled payload")])
def test_a_pickled_payload_is_refused_and_never_runs(tmp_path, craft, what):
    marker = tmp_path / "code_ran.txt"
    path = tmp_path / "hostile.pt2"
    path.write_bytes(_rewrite(_program_bytes(), craft(str(marker))))
    with pytest.raises(CheckpointError) as e:
        load_program(str(path))
    assert not marker.exists()
    msg = str(e.value)
    assert str(path) in msg and what in msg and "nothing in it was run" in msg


def test_a_compressed_or_foreign_member_is_refused(tmp_path):
    data = _program_bytes()
    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    path = tmp_path / "deflated.pt2"
    path.write_bytes(out.getvalue())
    with pytest.raises(CheckpointError, match="is compressed"):
        load_program(str(path))
    path.write_bytes(_rewrite(data, lambda n, b: b if not n.endswith("archive_format") else None))
    with pytest.raises(CheckpointError, match="older layout"):
        load_program(str(path))
    path.write_bytes(b"not a zip at all")
    with pytest.raises(CheckpointError, match="not a .pt2"):
        load_program(str(path))

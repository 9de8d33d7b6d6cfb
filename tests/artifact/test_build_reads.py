"""A build reads the checkpoint once: the manifest's weight fingerprints come from the export's reads."""

from __future__ import annotations

from artifact.shared import RANGES
from mixexport.driver.build import BuildOptions, build, reference_source
from mixexport.checkpoint.reader import Checkpoint


def test_a_checkpoint_build_reads_each_tensor_once(tiny_checkpoint, tmp_path, monkeypatch):
    import mixexport.checkpoint.reader as reader

    reads: list[str] = []
    real = reader.read_tensor
    monkeypatch.setattr(reader, "read_tensor", lambda info, out=None: reads.append(info.offset) or real(info, out))
    with reference_source(tiny_checkpoint, None, 0, {}, lambda _: None) as (ckpt, source):
        manifest = build(ckpt, source, tmp_path / "out", BuildOptions(targets=("ort",), validate=False, **RANGES),
                         lambda _: None)
    assert sorted(reads) == sorted(info.offset for info in ckpt.tensors.values())
    weights = [f for f in manifest.source["files"] if "weights_sha256" in f]
    assert [f["path"] for f in weights] == ["model.safetensors"]
    assert weights[0]["weights_sha256"] == Checkpoint(tiny_checkpoint).weights_sha256()["model.safetensors"]

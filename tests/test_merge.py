"""`latentgen.merge`: the weighted sum of two checkpoints (A1111's checkpoint merger), in Python and on the
command line, to folders and single files."""

import pytest
import torch

import components as C
from latentgen import LatentPipeline
from latentgen.cli import run_cli
from latentgen.errors import UserError
from latentgen.merge import main, merge_weights


def _pipe(seed: int, **parts) -> LatentPipeline:
    return LatentPipeline(**{**C.sd1_components(seed), **parts})


def _weights(pipe: LatentPipeline) -> dict:
    return {f"{name}.{k}": v.clone() for name in ("unet", "vae", "text_encoder")
            for k, v in getattr(pipe, name).state_dict().items()}


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_merge_is_the_weighted_sum_of_every_weight(alpha):
    a, b = _pipe(0), _pipe(1)
    wa, wb = _weights(a), _weights(b)
    merged = _weights(merge_weights(a, b, alpha))
    floats = [k for k in wa if wa[k].is_floating_point()]
    assert len(floats) > 300 and not torch.equal(wa[floats[0]], wb[floats[0]])
    for k in floats:
        assert torch.equal(merged[k], torch.lerp(wa[k], wb[k], alpha)), k
    if alpha in (0.0, 1.0):  # the ends are the models themselves, bit for bit
        assert all(torch.equal(merged[k], (wa if alpha == 0 else wb)[k]) for k in wa)


def test_merge_refuses_two_architectures():
    a = _pipe(0)
    wider = C.sd1_components(1)["unet"].config | {"cross_attention_dim": 32}
    from diffusers import UNet2DConditionModel

    b = _pipe(1, unet=UNet2DConditionModel.from_config(wider), text_encoder=C.clip("quick_gelu", hidden=32))
    before = _weights(a)
    with pytest.raises(UserError, match=r"cannot merge: unet .* is \(\d+, 64\) in the first model and \(\d+, 32\)"):
        merge_weights(a, b, 0.5)
    with pytest.raises(UserError, match="alpha must be between 0 and 1"):
        merge_weights(a, _pipe(1), 1.5)
    for pipe, value in ((a, 0), (b := _pipe(1), 1)):  # a counter, as BatchNorm keeps: to agree, not to average
        pipe.unet.register_buffer("steps_seen", torch.tensor(value))
    with pytest.raises(UserError, match="cannot merge: unet steps_seen differs and is not a weight"):
        merge_weights(a, b, 0.5)
    assert all(torch.equal(_weights(a)[k], v) for k, v in before.items())  # untouched by a refused merge


def test_merge_command_writes_folders_and_single_files(tmp_path, capsys):
    for seed in (0, 1):
        _pipe(seed).save_pretrained(tmp_path / f"m{seed}")
    expected = _weights(merge_weights(_pipe(0), _pipe(1), 0.25))
    assert run_cli(main, [str(tmp_path / "m0"), str(tmp_path / "m1"), str(tmp_path / "soup"), "--alpha", "0.25"]) == 0
    # a single file as the second model, a single file out, in fp16
    _pipe(1).save_single_file(tmp_path / "m1.safetensors")
    assert run_cli(main, [str(tmp_path / "m0"), str(tmp_path / "m1.safetensors"), str(tmp_path / "soup.safetensors"),
                          "--alpha", "0.25", "--fp16"]) == 0
    folder = _weights(LatentPipeline.from_pretrained(tmp_path / "soup", torch_dtype=torch.float32))
    single = _weights(LatentPipeline.from_pretrained(tmp_path / "soup.safetensors", torch_dtype=torch.float32))
    for k, v in expected.items():
        assert torch.equal(folder[k], v), k
        assert torch.equal(single[k], v.half().to(v.dtype) if v.is_floating_point() else v), k


def test_merge_command_mistakes_are_one_line_and_write_nothing(tmp_path, capsys):
    _pipe(0).save_pretrained(tmp_path / "m0")
    cases = [([str(tmp_path / "m0"), str(tmp_path / "none"), str(tmp_path / "out")], "none does not exist"),
             ([str(tmp_path / "m0"), str(tmp_path / "m0"), str(tmp_path / "out"), "--alpha", "2"],
              "alpha must be between 0 and 1 (the second model's weight), got 2"),
             ([str(tmp_path / "m0"), str(tmp_path / "m0"), str(tmp_path / "m0" / "model_index.json")],
              "is not what would be written there")]
    for argv, message in cases:
        assert run_cli(main, argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()

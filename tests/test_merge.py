"""`latentgen.merge`: the weighted sum of two checkpoints and the added difference of three (A1111's checkpoint
merger), in Python and on the command line, to folders and single files."""

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
    with pytest.raises(UserError, match="cannot merge: unet steps_seen differs between the first model and the "
                                        "second and is not a weight"):
        merge_weights(a, b, 0.5)
    after = _weights(a)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # untouched by a refused merge


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_add_difference_adds_what_b_changed_from_c_to_a(alpha):
    a, b, c = _pipe(0), _pipe(1), _pipe(2)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    merged = _weights(merge_weights(a, b, alpha, c))
    for k, v in wa.items():
        expected = v + alpha * (wb[k] - wc[k]) if v.is_floating_point() else v
        assert torch.equal(merged[k], expected), k
    same = _weights(merge_weights(_pipe(0), _pipe(1), 1.0, _pipe(1)))  # B = C: A itself
    assert all(torch.equal(same[k], v) for k, v in wa.items())


def _inpainting(seed: int) -> LatentPipeline:
    from diffusers import UNet2DConditionModel

    pipe = _pipe(seed)
    torch.manual_seed(seed)
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}  # "_use_default_values" would
    pipe.unet = UNet2DConditionModel(**{**config, "in_channels": 9}).eval()        # reset in_channels to 4
    assert pipe.inpainting_unet
    return pipe


def test_add_difference_makes_an_inpainting_model_of_a_fine_tune():
    """A1111's recipe: A the base's inpainting model (9 input channels), B a fine-tune, C the base (4): the
    difference lands in A's first 4 input channels; the masked image's and the mask's 5 stay A's."""
    a, b, c = _inpainting(0), _pipe(1), _pipe(2)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    merged = merge_weights(a, b, 1.0, c)
    assert merged.inpainting_unet
    w = _weights(merged)
    key = "unet.conv_in.weight"
    assert torch.equal(w[key][:, :4], wa[key][:, :4] + (wb[key] - wc[key]))
    assert torch.equal(w[key][:, 4:], wa[key][:, 4:])
    assert all(torch.equal(w[k], wa[k] + (wb[k] - wc[k])) for k in wa if k != key and wa[k].is_floating_point())
    before = _weights(b)
    with pytest.raises(UserError, match=r"conv_in.weight is \(32, 4, 3, 3\) in the first model and \(32, 9, 3, 3\) in "
                                        "the second; an inpainting model goes first, as A"):
        merge_weights(b, _inpainting(0), 0.5)
    with pytest.raises(UserError, match=r"\(32, 4, 3, 3\) in the second model and \(32, 9, 3, 3\) in the third"):
        merge_weights(_inpainting(0), b, 1.0, _inpainting(2))
    after = _weights(b)
    assert all(torch.equal(after[k], v) for k, v in before.items())


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


def test_merge_command_adds_a_difference(tmp_path):
    own = {"clip_skip": 1, "apg": {"norm_threshold": 2.0, "eta": 0.0, "momentum": 0.0}}  # A's sampling defaults
    for seed in (0, 1, 2):
        _pipe(seed, **(own if seed == 0 else {})).save_pretrained(tmp_path / f"m{seed}")
    expected = _weights(merge_weights(_pipe(0), _pipe(1), 0.7, _pipe(2)))
    assert run_cli(main, [str(tmp_path / "m0"), str(tmp_path / "m1"), str(tmp_path / "out"), "--alpha", "0.7",
                          "--subtract", str(tmp_path / "m2")]) == 0
    merged = LatentPipeline.from_pretrained(tmp_path / "out", torch_dtype=torch.float32)
    written = _weights(merged)
    assert all(torch.equal(written[k], v) for k, v in expected.items())
    assert {key: merged.config[key] for key in own} == own  # the merge keeps A's
    assert run_cli(main, [str(tmp_path / "m0"), str(tmp_path / "m1"), str(tmp_path / "out2"), "--subtract",
                          str(tmp_path / "none")]) == 2 and not (tmp_path / "out2").exists()


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

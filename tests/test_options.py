"""The option table (`latentgen.generation.options`): one declaration per option reaches every surface."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from dataclasses import field

import pytest

from conftest import ROOT, infer_script
from latentgen.errors import UserError
from latentgen.generation import options
from latentgen.generation.infotext import a1111_parameters, a1111_request
from latentgen.generation.options import option
from latentgen.generation.reference import page
from latentgen.generation.request import Request


@dataclasses.dataclass
class Knobbed(Request):
    """A request with a throwaway option, declared in one place: its field."""

    knob: float = field(default=0.0, metadata=option(
        "knob", flag="--knob", api="knob", text="Knob", help="a throwaway option for this test"))


def test_a_new_option_declared_once_is_on_every_surface(tiny_pipe):
    # the command line: infer.py's help and its parsing
    out = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stdout(out):
        infer_script().parse_args(["--help"], request_cls=Knobbed)
    assert "--knob KNOB" in out.getvalue() and "a throwaway option for this test" in out.getvalue()
    args = infer_script().parse_args(["--prompt", "x", "--knob", "0.25"], request_cls=Knobbed)
    assert options.from_args(args, Knobbed) == {"prompt": ["x"], "knob": 0.25}
    # the HTTP API: the body's schema and its reading
    from latentgen.server.a1111 import body_model, to_request

    body = body_model(Knobbed)
    schema = body.model_json_schema()["properties"]["knob"]
    assert schema["default"] == 0.0 and schema["description"] == "a throwaway option for this test"
    request, _, notes = to_request(body(prompt="x", knob=0.25, steps=2), cls=Knobbed)
    assert request.knob == 0.25 and notes == []
    # the image's metadata and its A1111 text, and both read back for a replay
    plan = Knobbed(prompt="x", knob=0.25, seed=1, num_inference_steps=2).fit(tiny_pipe)
    meta = tiny_pipe.generate(plan).metadata[0] | {"model": "m", "model_hash": "0", "version": "0"}
    assert meta["knob"] == 0.25 and Knobbed.from_metadata(meta).knob == 0.25
    text = a1111_parameters(meta, Knobbed)
    assert "Knob: 0.25" in text
    settings, _, unused = a1111_request(text, Knobbed)
    assert settings["knob"] == 0.25 and unused == []
    # the reference page
    assert "| knob | `knob` | `--knob` | `knob` | `Knob` | a throwaway option for this test |" in page(Knobbed)


def test_docs_options_page_is_the_tables():
    assert (ROOT / "docs" / "options.md").read_text() == page(Request), \
        "docs/options.md is stale: python -m latentgen.generation.reference > docs/options.md"


def test_every_option_is_on_the_cli_and_the_http_api_or_says_why_not():
    for f, opt in options.table(Request):
        python_only = "Python only" in opt.spelt
        assert opt.flag or opt.group or python_only or "infer.py" in opt.spelt, f.name
        assert opt.api or python_only or "HTTP" in opt.spelt, f.name
    assert {f.name for f in dataclasses.fields(Request)} - {f.name for f, _ in options.table(Request)} == {"checked"}


def test_each_surface_names_a_field_its_own_way():
    bad = Request(prompt="x", guidance_rescale=2.0)
    for surface, name in ((None, "guidance rescale"), ("cli", "--guidance-rescale"), ("api", "guidance_rescale")):
        with pytest.raises(UserError, match=f"^{name} must be in \\[0, 1\\], got 2"):
            bad.check(surface)
    hires = Request(prompt="x", hires={"scale": 20})
    for surface, name in ((None, "hires scale"), ("cli", "--hires-scale")):
        with pytest.raises(UserError, match=f"^{name} must be in \\(1, 8\\]"):
            hires.check(surface)
    with pytest.raises(UserError, match="^the hires fix is for text-to-image; with an image"):
        Request(prompt="x", hires={"scale": 2}, image=object()).check()
    with pytest.raises(UserError, match="^--hires-scale is for text-to-image; with --image"):
        Request(prompt="x", hires={"scale": 2}, image=object()).check("cli")


def test_group_flags_need_their_switch_and_an_off_flag_refuses_company():
    parse = infer_script().parse_args
    with pytest.raises(UserError, match="^--hires-steps needs --hires-scale"):
        options.from_args(parse(["--hires-steps", "5"]), Request)
    with pytest.raises(UserError, match="^--no-apg turns APG off; give it without --apg-eta"):
        options.from_args(parse(["--no-apg", "--apg-eta", "0.5"]), Request)
    assert options.from_args(parse(["--apg-eta", "0.5"]), Request)["apg"].eta == 0.5
    assert options.from_args(parse(["--no-apg"]), Request)["apg"] is False
    assert options.from_args(parse(["--clip-skip", "2"]), Request)["clip_skip"] == 1  # A1111's count
    with pytest.raises(UserError, match="^--clip-skip counts as A1111 does"):
        options.from_args(parse(["--clip-skip", "0"]), Request)


def test_options_a1111_lacks_reach_the_server_and_read_back_from_the_text(tiny_pipe):
    """Eta, guidance interval, dynamic threshold, APG and guidance rescale: on the HTTP API (the A1111 body's extra
    fields), written into the image's text, and read back."""
    from latentgen.server.a1111 import Txt2Img, to_request

    body = Txt2Img(prompt="x", steps=3, eta=0.5, guidance_interval=[0.2, 0.9], dynamic_threshold=0.99,
                   apg={"norm_threshold": 1.0}, guidance_rescale=0.3, sampler_name="DDIM")
    request, _, notes = to_request(body)
    assert notes == []
    plan = request.fit(tiny_pipe)
    meta = tiny_pipe.generate(plan).metadata[0] | {"model": "m", "model_hash": "0", "version": "0"}
    text = a1111_parameters(meta)
    for part in ("Eta: 0.5", "Guidance interval: 0.2-0.9", "Dynamic threshold: 0.99",
                 'APG: "threshold 1, eta 0, momentum 0"', "CFG Rescale phi: 0.3"):
        assert part in text, text
    settings, _, unused = a1111_request(text)
    assert unused == [] and settings["eta"] == 0.5 and settings["guidance_interval"] == (0.2, 0.9)
    assert settings["apg"].norm_threshold == 1.0 and settings["dynamic_threshold"] == 0.99

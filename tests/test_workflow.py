"""The ComfyUI workflow reader: one workflow per feature, each mapped to the request it
specifies (values and sources), and its refusals as one line from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_workflow import NAMES, UI, cli, one_line_error, pair, tail, template

from wanrender.errors import WanrenderError
from wanrender.workflow.expr import ExprError, evaluate
from wanrender.workflow.reader import read_data

BASE = {"steps": 4, "switch": 2, "cfg": 1.0, "sampler": "euler", "seed": 42, "frames": 81, "width": 832,
        "height": 1216, "fps": 16, "shift_high": 5.0, "shift_low": 5.0, "lora_strength_high": 1.0,
        "lora_strength_low": 1.0, "prompt": "a bear cub in snow", "negative": "blurry"}  # fmt: skip


def _ignored(reading) -> dict[str, str]:
    return {i: why for i, _, why in reading.ignored}


def test_the_template_maps_to_the_turbo_request() -> None:
    w = UI()
    ids = template(w)
    r = read_data(w.data())
    assert r.fields == BASE
    assert {k: v.value for k, v in r.files.items()} == {
        "high": NAMES["high"], "low": NAMES["low"], "lora_high": NAMES["lora_high"],
        "lora_low": NAMES["lora_low"], "text_encoder": NAMES["te"], "vae": NAMES["vae"],
    }  # fmt: skip
    assert r.image.value == "cat.png" and r.output == f"#{ids['save']} SaveVideo"
    assert r.sources["steps"] == f"#{ids['a']} KSamplerAdvanced.steps"
    assert (
        r.sources["switch"] == f"#{ids['a']} KSamplerAdvanced.end_at_step / #{ids['b']} KSamplerAdvanced.start_at_step"
    )
    assert r.sources["shift_low"] == f"#{ids['shift_low']} ModelSamplingSD3.shift"
    assert r.ignored == []


def test_a_4_step_group_beside_a_bypassed_20_step_group() -> None:
    w = UI()
    ids = template(w)
    w.group("turbo 4 steps", -10, -10, 20, 20)
    w.group("quality 20 steps", 990, 990, 100, 100)
    # The 20-step group: its own pair, decode and output, all bypassed (Ctrl+B on the group).
    a20, b20 = pair(w, (ids["shift_high"], ids["shift_low"]), ids["i2v"], steps=20, switch=10, cfg=3.5, mode=4,
                    pos=(1000, 1000))  # fmt: skip
    side: dict = {"vae": ids["vae"]}
    tail(w, side, b20, mode=4, pos=(1000, 1000))
    r = read_data(w.data())
    assert r.fields == BASE
    ignored = _ignored(r)
    assert ignored[str(a20)] == "bypassed (group 'quality 20 steps')"
    assert ignored[str(side["save"])].startswith("bypassed")


def test_bypassed_samplers_in_the_path_pass_their_latent_through() -> None:
    """i2v -> 20-step pair (bypassed) -> 4-step pair: bypassing passes latent_image on."""
    w = UI()
    ids = template(w)
    a20, b20 = pair(w, (ids["shift_high"], ids["shift_low"]), ids["i2v"], steps=20, switch=10, mode=4)
    a4 = w.node(ids["a"])
    old = a4["inputs"][3]["link"]
    w.links = [ln for ln in w.links if ln[0] != old]
    a4["inputs"][3]["link"] = None
    w.link(b20, 0, ids["a"], "latent_image", "LATENT")
    r = read_data(w.data())
    assert r.fields == BASE
    assert _ignored(r)[str(a20)] == "bypassed: its inputs pass through"


def test_muted_nodes_do_not_count_and_a_muted_node_in_the_path_is_named() -> None:
    w = UI()
    ids = template(w)
    webp = w.add("SaveAnimatedWEBP", ["ComfyUI", 16.0, False, 90, "default"], mode=2)
    w.link(ids["decode"], 0, webp, "images", "IMAGE")
    extra_lora = w.add("LoraLoaderModelOnly", ["other.safetensors", 0.7], mode=2)
    w.link(ids["unet_high"], 0, extra_lora, "model", "MODEL")
    r = read_data(w.data())
    assert r.fields == BASE
    assert _ignored(r)[str(webp)] == "muted (mode never)" and _ignored(r)[str(extra_lora)] == "muted (mode never)"
    w.node(ids["lora_high"])["mode"] = 2
    with pytest.raises(WanrenderError, match=rf"#{ids['lora_high']} LoraLoaderModelOnly is muted"):
        read_data(w.data())


def _subgraph_workflow(flag: bool) -> tuple[UI, dict]:
    """The sampler pair inside a subgraph ("Sampling"): steps promoted through a subgraph
    input, both samplers' cfg promoted by proxyWidgets; outside it, a core Switch
    fed by a PrimitiveBoolean chooses the high expert's shift (5 or 8), a Crystools switch
    the low expert's."""
    w = UI()
    ids = template(w)
    for nid in (ids["a"], ids["b"]):  # the pair moves into the subgraph
        w.nodes.remove(w.node(nid))
    inner = UI()
    ins = ["model_high", "model_low", "positive", "negative", "latent", "steps"]
    a = inner.add("KSamplerAdvanced", ["enable", 7, "fixed", 99, 9.0, "euler", "simple", 0, 2, "enable"])
    b = inner.add("KSamplerAdvanced", ["disable", 7, "fixed", 99, 9.0, "euler", "simple", 2, 10000, "disable"])
    links = []

    def sg_link(origin, oslot, target, name, typ):
        t = inner.node(target)
        names = [i["name"] for i in t["inputs"]]
        if name not in names:
            t["inputs"].append({"name": name, "type": typ, "link": None, "widget": {"name": name}})
            names.append(name)
        lid = 100 + len(links)
        t["inputs"][names.index(name)]["link"] = lid
        links.append({"id": lid, "origin_id": origin, "origin_slot": oslot, "target_id": target,
                      "target_slot": names.index(name), "type": typ})  # fmt: skip

    for s, k in ((a, 0), (b, 1)):
        sg_link(-10, k, s, "model", "MODEL")
        sg_link(-10, 2, s, "positive", "CONDITIONING")
        sg_link(-10, 3, s, "negative", "CONDITIONING")
        sg_link(-10, 5, s, "steps", "INT")
    sg_link(-10, 4, a, "latent_image", "LATENT")
    sg_link(a, 0, b, "latent_image", "LATENT")
    links.append({"id": 199, "origin_id": b, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "LATENT"})
    sgid = "5f0c3a8e-0000-4000-8000-00000000abcd"
    w.subgraphs.append({
        "id": sgid, "name": "Sampling", "nodes": inner.nodes, "links": links,
        "inputs": [{"id": f"i{k}", "name": n, "type": "*", "linkIds": []} for k, n in enumerate(ins)],
        "outputs": [{"id": "o0", "name": "LATENT", "type": "LATENT", "linkIds": [199]}],
    })  # fmt: skip
    types = ["MODEL", "MODEL", "CONDITIONING", "CONDITIONING", "LATENT", "INT"]
    sg = w.add(sgid, [4], inputs=list(zip(ins, types)), outputs=["LATENT"])
    w.node(sg)["inputs"][5]["widget"] = {"name": "steps"}
    w.node(sg)["properties"] = {"proxyWidgets": [["-1", "steps"], [str(a), "cfg"], [str(b), "cfg"]]}
    w.node(sg)["widgets_values"] = [4, 1.0, 1.0]
    # The switches choose the models fed to the subgraph.
    alt = w.add("ModelSamplingSD3", [8.0])
    w.link(ids["lora_high"], 0, alt, "model", "MODEL")
    flag_node = w.add("PrimitiveBoolean", [flag])
    core = w.add("ComfySwitchNode", [True])
    w.link(flag_node, 0, core, "switch", "BOOLEAN")
    w.link(alt, 0, core, "on_true", "MODEL")
    w.link(ids["shift_high"], 0, core, "on_false", "MODEL")
    crys = w.add("Switch any [Crystools]", [False])
    w.link(ids["shift_low"], 0, crys, "on_false", "MODEL")
    w.link(alt, 0, crys, "on_true", "MODEL")
    for k, src in enumerate((core, crys)):
        w.link(src, 0, sg, ins[k], "MODEL")
    w.link(ids["i2v"], 0, sg, "positive", "CONDITIONING")
    w.link(ids["i2v"], 1, sg, "negative", "CONDITIONING")
    w.link(ids["i2v"], 2, sg, "latent", "LATENT")
    dec = w.node(ids["decode"])
    w.links = [ln for ln in w.links if ln[0] != dec["inputs"][0]["link"]]
    dec["inputs"][0]["link"] = None
    w.link(sg, 0, ids["decode"], "samples", "LATENT")
    return w, {**ids, "sg": sg, "inner_a": a, "alt": alt, "core": core}


def test_a_subgraph_with_promoted_widgets_and_a_switch() -> None:
    w, ids = _subgraph_workflow(flag=False)
    r = read_data(w.data())
    assert r.fields == {**BASE, "seed": 7}
    sg = ids["sg"]
    assert r.sources["steps"].startswith(f"#{sg} subgraph 'Sampling' · steps (promoted widget)")
    assert r.sources["cfg"] == f"#{sg} subgraph 'Sampling' · cfg (promoted widget)"
    assert r.sources["seed"] == f"#{sg}:{ids['inner_a']} KSamplerAdvanced.noise_seed"
    assert any(f"#{ids['core']} ComfySwitchNode: switch is False" in n for n in r.notes)
    assert _ignored(r)[str(ids["alt"])] == f"switched off by #{ids['core']} ComfySwitchNode"
    on = read_data(_subgraph_workflow(flag=True)[0].data())
    assert on.fields["shift_high"] == 8.0 and on.sources["shift_high"] == f"#{ids['alt']} ModelSamplingSD3.shift"


def test_primitives_and_reroutes_feed_widgets() -> None:
    w = UI()
    ids = template(w)
    seed = w.add("PrimitiveInt", [1234, "randomize"])
    steps = w.add("PrimitiveNode", [6, "fixed"], outputs=["INT"])
    text = w.add("PrimitiveStringMultiline", ["a fox in the rain"])
    cfg = w.add("PrimitiveFloat", [1.0])
    reroute = w.add("Reroute", inputs=[("", "*")], outputs=["*"])
    w.link(seed, 0, ids["a"], "noise_seed", "INT")
    for s in (ids["a"], ids["b"]):
        w.link(steps, 0, s, "steps", "INT")
        w.link(cfg, 0, s, "cfg", "FLOAT")
    w.link(text, 0, reroute, "", "STRING")
    w.link(reroute, 0, ids["pos"], "text", "STRING")
    r = read_data(w.data())
    assert r.fields == {**BASE, "seed": 1234, "steps": 6, "prompt": "a fox in the rain"}
    assert r.sources["seed"] == f"#{seed} PrimitiveInt.value → #{ids['a']} KSamplerAdvanced.noise_seed"
    assert r.sources["prompt"].startswith(f"#{text} PrimitiveStringMultiline.value")
    assert any("'randomize'" in n and "stored value is used" in n for n in r.notes)
    assert str(reroute) not in _ignored(r)


@pytest.mark.parametrize("ntype, widget, expect", [("MathExpression|pysssss", "floor(a * b + 1)", 81),
                                                   ("SimpleMath+", "a * b + 1", 81)])  # fmt: skip
def test_a_math_node_computes_the_frame_count(ntype: str, widget: str, expect: int) -> None:
    w = UI()
    ids = template(w, frames=33)
    seconds = w.add("PrimitiveFloat", [5.0])
    fps = w.add("PrimitiveInt", [16, "fixed"])
    math_node = w.add(ntype, [widget])
    w.link(seconds, 0, math_node, "a", "FLOAT")
    w.link(fps, 0, math_node, "b", "INT")
    w.link(math_node, 0, ids["i2v"], "length", "INT")
    r = read_data(w.data())
    assert r.fields["frames"] == expect
    assert f"#{math_node} {ntype} `{widget}`" in r.sources["frames"]


def test_the_expression_evaluator_is_arithmetic_only() -> None:
    assert evaluate("floor(a*b+1)", {"a": 5.0, "b": 16}) == 81
    assert evaluate("max(a, 2) ** 2 // 3 % 5 - -1", {"a": 4}) == 1 + (16 // 3) % 5
    for bad in ("__import__('os')", "a.__class__", "9 ** 999", "1 / 0", "open(a)", "a +"):
        with pytest.raises(ExprError):
            evaluate(bad, {"a": 1})


def _api_template() -> dict:
    """ComfyUI's API export of the template, written out by hand."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": NAMES["high"], "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": NAMES["low"], "weight_dtype": "default"}},
        "3": {"class_type": "ModelSamplingSD3", "inputs": {"shift": 5.0, "model": ["1", 0]}},
        "4": {"class_type": "ModelSamplingSD3", "inputs": {"shift": 6.0, "model": ["2", 0]}},
        "5": {"class_type": "CLIPLoader", "inputs": {"clip_name": NAMES["te"], "type": "wan", "device": "default"}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": NAMES["vae"]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["5", 0]}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["5", 0]}},
        "9": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
        "10": {"class_type": "WanImageToVideo", "inputs": {"width": 640, "height": 640, "length": 49, "batch_size": 1,
               "positive": ["7", 0], "negative": ["8", 0], "vae": ["6", 0], "start_image": ["9", 0]}},
        "11": {"class_type": "KSamplerAdvanced", "inputs": {"add_noise": "enable", "noise_seed": 5, "steps": 20,
               "cfg": 3.5, "sampler_name": "euler", "scheduler": "simple", "start_at_step": 0, "end_at_step": 10,
               "return_with_leftover_noise": "enable", "model": ["3", 0], "positive": ["10", 0],
               "negative": ["10", 1], "latent_image": ["10", 2]}},
        "12": {"class_type": "KSamplerAdvanced", "inputs": {"add_noise": "disable", "noise_seed": 5, "steps": 20,
               "cfg": 3.5, "sampler_name": "euler", "scheduler": "simple", "start_at_step": 10, "end_at_step": 10000,
               "return_with_leftover_noise": "disable", "model": ["4", 0], "positive": ["10", 0],
               "negative": ["10", 1], "latent_image": ["11", 0]}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["6", 0]}},
        "14": {"class_type": "RIFE VFI", "inputs": {"ckpt_name": "rife47.pth", "multiplier": 2, "frames": ["13", 0]}},
        "15": {"class_type": "VHS_VideoCombine", "inputs": {"frame_rate": 32, "crf": 20, "images": ["14", 0],
               "filename_prefix": "x", "format": "video/h264-mp4"}},
    }  # fmt: skip


def test_the_api_format() -> None:
    for data in (_api_template(), {"prompt": _api_template(), "client_id": "x"}):
        r = read_data(data)
        assert r.format == "api" and r.output == "#15 VHS_VideoCombine"
        assert r.fields == {"steps": 20, "switch": 10, "cfg": 3.5, "sampler": "euler", "seed": 5, "frames": 49,
                            "width": 640, "height": 640, "fps": 32, "interpolate": "rife", "crf": 20,
                            "shift_high": 5.0, "shift_low": 6.0, "lora_strength_high": 0.0, "lora_strength_low": 0.0,
                            "prompt": "a cat", "negative": ""}  # fmt: skip


def test_an_unsupported_node_in_the_path_is_one_line_and_one_outside_is_ignored(tmp_path: Path) -> None:
    w = UI()
    ids = template(w)
    outside = w.add("ImageUpscaleWithModel", inputs=[("image", "IMAGE")], outputs=["IMAGE"])
    w.link(ids["image"], 0, outside, "image", "IMAGE")
    res = cli("workflow", "show", str(w.write(tmp_path / "ok.json")), "--json")
    assert res.returncode == 0, res.stderr
    shown = json.loads(res.stdout)
    assert shown["request"]["steps"] == 4
    assert {"id": str(outside), "type": "ImageUpscaleWithModel", "why": "not on the path to the output"} in shown[
        "ignored"
    ]
    # Now in the path: between LoadImage and WanImageToVideo.
    i2v = w.node(ids["i2v"])
    w.links = [ln for ln in w.links if ln[0] != i2v["inputs"][4]["link"]]
    i2v["inputs"][4]["link"] = None
    w.link(outside, 0, ids["i2v"], "start_image", "IMAGE")
    line = one_line_error(cli("workflow", "show", str(w.write(tmp_path / "bad.json"))))
    assert f"#{outside} ImageUpscaleWithModel is on the active path" in line and "bypass" in line


@pytest.mark.parametrize("case", ["5b", "t2v", "image", "sampler", "scheduler", "frames"])
def test_other_families_and_values_the_request_cannot_take_are_refused(case: str, tmp_path: Path) -> None:
    w = UI()
    ids = template(w)
    if case == "5b":
        lat = w.add("Wan22ImageToVideoLatent", [1280, 704, 121, 1], inputs=[("vae", "VAE")], outputs=["LATENT"])
        a = w.node(ids["a"])
        w.links = [ln for ln in w.links if ln[0] != a["inputs"][3]["link"]]
        a["inputs"][3]["link"] = None
        w.link(lat, 0, ids["a"], "latent_image", "LATENT")
        expect = "Wan 2.2 5B (TI2V)"
    elif case == "t2v":
        i2v = w.node(ids["i2v"])
        w.links = [ln for ln in w.links if ln[0] != i2v["inputs"][4]["link"]]
        i2v["inputs"][4]["link"] = None
        expect = "text-to-video"
    elif case == "image":
        w = UI()
        w.add("CheckpointLoaderSimple", ["sdxl.safetensors"], outputs=["MODEL", "CLIP", "VAE"])
        w.add("SaveImage", ["ComfyUI"], inputs=[("images", "IMAGE")])
        expect = "an image-model checkpoint"
    elif case == "sampler":
        w.node(ids["a"])["widgets_values"][5] = w.node(ids["b"])["widgets_values"][5] = "uni_pc"
        expect = f"#{ids['a']} KSamplerAdvanced.sampler_name: unknown sampler 'uni_pc' — choose one of euler"
    elif case == "scheduler":
        w.node(ids["a"])["widgets_values"][6] = "karras"
        expect = "scheduler 'karras' is not implemented — set it to simple"
    else:
        w.node(ids["i2v"])["widgets_values"][2] = 80
        expect = f"#{ids['i2v']} WanImageToVideo.length: frames 80 is invalid: frames must be 4k+1"
    path = w.write(tmp_path / "wf.json")
    command = ["workflow", "show", str(path)] if case in ("t2v", "frames") else ["generate", "--workflow", str(path)]
    line = one_line_error(cli(*command, "--device", "cpu", "--out", str(tmp_path / "o.mp4")) if "generate" in command
                          else cli(*command))  # fmt: skip
    assert expect in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wf.json"]  # nothing written


def test_a_single_ksampler_runs_one_expert_throughout() -> None:
    w = UI()
    ids = template(w)
    for nid in (ids["a"], ids["b"]):
        w.nodes.remove(w.node(nid))
    k = w.add("KSampler", [9, "fixed", 6, 1.0, "dpmpp_2m", "simple", 1.0])
    w.link(ids["shift_high"], 0, k, "model", "MODEL")
    w.link(ids["i2v"], 0, k, "positive", "CONDITIONING")
    w.link(ids["i2v"], 1, k, "negative", "CONDITIONING")
    w.link(ids["i2v"], 2, k, "latent_image", "LATENT")
    dec = w.node(ids["decode"])
    w.links = [ln for ln in w.links if ln[0] != dec["inputs"][0]["link"]]
    dec["inputs"][0]["link"] = None
    w.link(k, 0, ids["decode"], "samples", "LATENT")
    r = read_data(w.data())
    assert (r.fields["steps"], r.fields["switch"], r.fields["sampler"], r.fields["seed"]) == (6, 6, "dpmpp_2m", 9)
    assert "low" not in r.files and "lora_low" not in r.files  # the other expert comes from --low or --models
    w.node(ids["unet_high"])["widgets_values"][0] = "my_wan_model.safetensors"
    with pytest.raises(WanrenderError, match="cannot tell which Wan 2.2 expert"):
        read_data(w.data())


def test_stacked_loras_one_active_per_expert() -> None:
    w = UI()
    ids = template(w)
    extra = w.add("LoraLoaderModelOnly", ["style.safetensors", 0.0])
    sh = w.node(ids["shift_high"])
    w.links = [ln for ln in w.links if ln[0] != sh["inputs"][0]["link"]]
    sh["inputs"][0]["link"] = None
    w.link(ids["lora_high"], 0, extra, "model", "MODEL")
    w.link(extra, 0, ids["shift_high"], "model", "MODEL")
    r = read_data(w.data())
    assert r.fields == BASE and r.files["lora_high"].value == NAMES["lora_high"]
    assert any(f"#{extra} LoraLoaderModelOnly: strength 0" in n for n in r.notes)
    w.node(extra)["widgets_values"][1] = 0.8
    with pytest.raises(WanrenderError, match="2 LoRAs on the high-noise expert"):
        read_data(w.data())


def test_two_outputs_of_one_render_follow_the_interpolated_one() -> None:
    w = UI()
    ids = template(w)
    rife = w.add("RIFE VFI", ["rife47.pth", 10, 2, True, True, 1.0])
    w.link(ids["decode"], 0, rife, "frames", "IMAGE")
    combine = w.add("VHS_VideoCombine", {"frame_rate": 32, "loop_count": 0, "filename_prefix": "x",
                                         "format": "video/h264-mp4", "crf": 19, "save_output": True})  # fmt: skip
    w.link(rife, 0, combine, "images", "IMAGE")
    r = read_data(w.data())
    assert r.output == f"#{combine} VHS_VideoCombine"
    assert r.fields == {**BASE, "fps": 32, "interpolate": "rife", "crf": 19}
    assert _ignored(r)[str(ids["save"])].startswith("another output of the same render")
    # Outputs of two different renders: the 20-step pair feeds a second decode and output.
    a20, b20 = pair(w, (ids["shift_high"], ids["shift_low"]), ids["i2v"], steps=20, switch=10)
    tail(w, {"vae": ids["vae"]}, b20)
    with pytest.raises(WanrenderError, match="video outputs of different renders"):
        read_data(w.data())


def test_malformed_and_foreign_files_are_one_line(tmp_path: Path) -> None:
    w = UI()
    ids = template(w)
    w.node(ids["a"])["mode"] = "sometimes"
    line = one_line_error(cli("workflow", "show", str(w.write(tmp_path / "bad.json"))))
    assert "a malformed ComfyUI workflow" in line and "save it again" in line
    for data, match in (([1, 2], "not a ComfyUI workflow"), ({"nodes": [], "links": []}, "no active video output")):
        with pytest.raises(WanrenderError, match=match):
            read_data(data)
    w = UI()
    ids = template(w)
    w.node(ids["video"])["widgets_values"] = [float("inf")]
    w.node(ids["a"])["inputs"][0]["link"] = [3]  # not a link id
    with pytest.raises(WanrenderError, match="comes from nothing|missing"):
        read_data(json.loads(json.dumps(w.data())))

"""Settings read once, checked, and documented; a project's extra params; the one config parser."""

from pathlib import Path

import pytest

from backend.config import AgentSettings, Settings
from backend.errors import SettingsError
from backend.labelstudio.label_config import LabelConfig, check_label_config

ROOT = Path(__file__).resolve().parents[1]


def test_settings_come_from_the_environment_once_and_bad_values_name_their_variable():
    s = Settings.from_env({"SMARTSAM_THREADS": "6", "SMARTSAM_ALLOWED_HOSTS": "Img.Example:80, cdn", "SMARTSAM_REQUIRE_CLICK": "off",
                           "SMARTSAM_DATA_DIR": "/tmp/d", "SMARTSAM_FAST_PATH": "ON", "SMARTSAM_IMAGE_TIMEOUT": "2.5",
                           "SMARTSAM_CHAIN_LENGTH": ""})  # empty = unset
    assert (s.threads, s.allowed_hosts, s.require_click, s.data_dir, s.fast_path) == (6, ("img.example:80", "cdn"), False,
                                                                                        Path("/tmp/d"), "on")
    assert s.image_timeout == 2.5 and s.chain_length == 3
    assert Settings.from_env({}) == Settings()  # the documented defaults
    for env, words in [({"SMARTSAM_THREADS": "many"}, "SMARTSAM_THREADS"), ({"SMARTSAM_THREADS": "1"}, "SMARTSAM_THREADS"),
                       ({"SMARTSAM_CHAIN_LENGTH": "99"}, "chain_length"), ({"SMARTSAM_CPU_BF16": "yes"}, "SMARTSAM_CPU_BF16"),
                       ({"SMARTSAM_COMPILE": "max"}, "SMARTSAM_COMPILE"),
                       ({"SMARTSAM_COMPARE": "plain:2"}, "SMARTSAM_COMPARE"), ({"LOCAL_FILES_DOCUMENT_ROOT": "/"}, "LOCAL_FILES"),
                       ({"SMARTSAM_REQUEST_TIMEOUT": "0"}, "SMARTSAM_REQUEST_TIMEOUT"),
                       ({"SMARTSAM_WRITE_TIMEOUT": "0"}, "SMARTSAM_WRITE_TIMEOUT")]:
        with pytest.raises(SettingsError, match=words):
            Settings.from_env(env)


def test_every_setting_is_in_the_operating_page_table():
    page = (ROOT / "docs" / "operating.md").read_text()
    table = page[page.index("# Operating it"):page.index("- **Serving**")]
    missing = [v for v in Settings.ENV if f"`{v}`" not in table]
    assert not missing, missing


def test_extra_params_are_validated_and_named():
    base = AgentSettings()
    a = base.with_extra_params({"chain_length": 1, "fast_path": "On", "require_click": False})
    assert (a.chain_length, a.fast_path, a.require_click, a.exemplars) == (1, "on", False, 1)
    assert a.tag(base) == "chain1-faston-clickoff" and base.tag(base) == ""
    assert base.with_extra_params(None) == base and base.with_extra_params({}) == base
    for bad, words in [({"chains": 2}, "unknown extra params"), ({"chain_length": "2"}, "chain_length"),
                       ({"chain_length": True}, "chain_length"), ({"exemplars": 0}, "exemplars"),
                       ({"fast_path": "fast"}, "fast_path"), ({"require_click": "no"}, "require_click"), ([1], "JSON object")]:
        with pytest.raises(SettingsError, match=words):
            base.with_extra_params(bad)


def test_one_parser_for_the_labeling_config():
    cfg = LabelConfig.parse((ROOT / "label_config.xml").read_text())
    assert (cfg.image_name, cfg.image_key, [a.name for a in cfg.answers]) == ("image", "image", ["mask"])
    assert cfg.labels == ("Object", "Background object") and [p.tag for p in cfg.prompts] == ["KeyPointLabels", "RectangleLabels"]
    for kind, tag in (("polygon", "PolygonLabels"), ("bitmask", "BitmaskLabels"), ("box", "RectangleLabels")):
        c = LabelConfig.parse((ROOT / f"label_config_{kind}.xml").read_text())  # the example configs
        assert [a.tag for a in c.answers] == [tag] and c.labels == cfg.labels and len(c.prompts) == 2
    text_first = ('<View><Text name="caption" value="$caption"/><Image name="photo" value="$img"/>'
                  '<KeyPointLabels name="kp" toName="photo" smart="true"><Label value="Car"/></KeyPointLabels>'
                  '<BrushLabels name="paint" toName="photo"><Label value="Car"/></BrushLabels></View>')
    cfg = LabelConfig.parse(text_first)
    assert (cfg.image_key, cfg.image_name, cfg.answers[0].name) == ("img", "photo", "paint")
    assert check_label_config(text_first) == []
    no_smart = text_first.replace(' smart="true"', "")
    assert "smart" in check_label_config(no_smart)[0]
    assert LabelConfig.parse(no_smart, need_prompts=False).image_key == "img"  # a brush project, for evaluation
    uncovered = text_first.replace('<Label value="Car"/></KeyPointLabels>', '<Label value="Bus"/></KeyPointLabels>')
    assert "['Bus']" in check_label_config(uncovered)[0]
    assert "not valid XML" in check_label_config("<View")[0]


def test_a_write_waits_for_label_studio_as_long_as_the_settings_say():
    """SMARTSAM_WRITE_TIMEOUT bounds a prediction write (30 s by default, as before it was a
    setting), never below SMARTSAM_IMAGE_TIMEOUT."""
    from backend.labelstudio.client import LabelStudioClient

    assert LabelStudioClient(Settings()).post_timeout == 30.0
    assert LabelStudioClient(Settings.from_env({"SMARTSAM_WRITE_TIMEOUT": "10"})).post_timeout == 20.0
    assert LabelStudioClient(Settings.from_env({"SMARTSAM_WRITE_TIMEOUT": "10", "SMARTSAM_IMAGE_TIMEOUT": "5"})).post_timeout == 10.0
    assert LabelStudioClient(Settings.from_env({"SMARTSAM_IMAGE_TIMEOUT": "45"})).post_timeout == 45.0

"""Pre-labeling on Ray runs exactly the driver's settings: the workers get its Settings object."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABEL_CONFIG = (ROOT / "label_config.xml").read_text()


def test_every_agent_setting_reaches_a_ray_worker(tmp_path):
    import ray

    from backend.config import Settings
    from backend.server import Services
    from backend.cli.prelabel import PrelabelWorker
    from smartsam.agent import FAST_PATH_IOU

    s = Settings(backbone="sam2.1_hiera_tiny-random", data_dir=tmp_path / "data", chain_length=1, fast_path="on",
                 require_click=False, exemplars=2, cpu_bf16="off", shared_decoder="off", seed=7, reference_prep="none",
                 embed_cache_dir=str(tmp_path / "emb"), image_timeout=7.0, max_pixels=1_000_000)
    # the workers' own environment says otherwise everywhere: it must not matter
    contrary = {"SMARTSAM_CHAIN_LENGTH": "3", "SMARTSAM_FAST_PATH": "off", "SMARTSAM_REQUIRE_CLICK": "true",
                "SMARTSAM_EXEMPLARS": "1", "SMARTSAM_CPU_BF16": "on", "SMARTSAM_SHARED_DECODER": "on", "SMARTSAM_SEED": "0",
                "SMARTSAM_REFERENCE_PREP": "paper", "SMARTSAM_BACKBONE": "disk-test"}
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": contrary})
    try:
        worker = ray.remote(PrelabelWorker).remote(s, LABEL_CONFIG, "1")
        eff = ray.get(worker.effective.remote(), timeout=300)
    finally:
        ray.shutdown()
    assert eff["settings"] == s  # every field, as the driver read it
    assert eff["backbone"] == "sam2.1_hiera_tiny-random"
    assert eff["chain_length"] == 1 and eff["dedupe_iou"] == FAST_PATH_IOU and eff["require_click"] is False
    assert eff["seed"] == 7 and eff["reference_prep"] == "none" and eff["agent_settings"].exemplars == 2
    assert eff["cpu_bf16"] is False and eff["shared_decoder"] is False and eff["embed_cache"] == str(tmp_path / "emb")
    # the driver's model version, computed the backend's way, is the worker's
    sv = Services(s, load=False)
    assert eff["model_version"] == sv.versions.model_version("1")
    sv.close()

"""Precomputed embeddings: a pre-embedded image's first click makes no encoder call."""

import numpy as np

from backend_helpers import Backend, ImageServer, TOKEN, keypoint, predict_body
from cli_helpers import run_cli
from smartsam.backbones.base import Prompt
from smartsam.embed_cache import EmbeddingDiskCache
from smartsam.models import load_backbone


def test_disk_cache_round_trip_bound_and_damage(tmp_path, grabcut_image):
    cache = EmbeddingDiskCache(tmp_path, max_bytes=1 << 40)
    a = load_backbone("sam_vit_tiny-random", device="cpu")
    a.disk_cache = cache
    key = a.set_image(grabcut_image)
    assert a.encoder_calls == 1 and cache.has(a.cache_id, key)
    ref = a.predict([Prompt([[200, 150]], [1])], multimask=True)

    b = load_backbone("sam_vit_tiny-random", device="cpu")  # a new process would be the same
    b.disk_cache = cache
    b.set_image(grabcut_image)
    assert b.encoder_calls == 0 and b.disk_hits == 1  # counted on the real model object
    out = b.predict([Prompt([[200, 150]], [1])], multimask=True)
    assert np.allclose(out.low_res_logits, ref.low_res_logits, atol=0.05)  # fp16 storage
    # another backbone never reads this one's embeddings
    c = load_backbone("sam2.1_hiera_tiny-random", device="cpu")
    c.disk_cache = cache
    c.set_image(grabcut_image)
    assert c.encoder_calls == 1
    # damaged file: dropped and recomputed, never used
    f = next((tmp_path / f"{b.cache_id}-v1").rglob("*.pt"))
    f.write_bytes(b"junk")
    d = load_backbone("sam_vit_tiny-random", device="cpu")
    d.disk_cache = cache
    d.set_image(grabcut_image)
    assert d.encoder_calls == 1
    # size bound: least recently used files go first
    small = EmbeddingDiskCache(tmp_path, max_bytes=cache.size_bytes() - 1)
    assert small.evict() >= 1 and small.size_bytes() <= small.max_bytes


def test_backend_first_click_on_pre_embedded_image_makes_no_encoder_call(tmp_path, datasets):
    cache = tmp_path / "embeddings"
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    (img_dir / "penguin.jpg").write_bytes((datasets / "GrabCut/img/106024.jpg").read_bytes())
    p = run_cli("embed", str(img_dir), "--backbone", "sam2.1_hiera_tiny-random",
                env={"SMARTSAM_EMBED_CACHE_DIR": str(cache)}, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "1 images embedded (1 encoded" in p.stdout
    server = ImageServer({"penguin.jpg": (img_dir / "penguin.jpg").read_bytes()})
    b = Backend(tmp_path / "data", env={"SMARTSAM_EMBED_CACHE_DIR": str(cache), "LABEL_STUDIO_URL": server.url,
                                        "LABEL_STUDIO_API_KEY": TOKEN}).start()
    try:
        status, r = b.post("/predict", predict_body("/data/upload/penguin.jpg", [keypoint(50, 50)]))
        assert status == 200 and r["results"][0]["result"]
        h = b.health()
        assert h["encoder_calls"] == 0 and h["embedding_disk_hits"] == 1
    finally:
        b.stop()
        server.close()

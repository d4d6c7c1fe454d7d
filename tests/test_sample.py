"""Loading a trained generator and drawing images from it (API and CLI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from src.atomic import save_torch_atomic
from src.errors import UserError
from src.models import Generator, cpu_state
from src.params import parse_params
from src.generator import GeneratorFileError, generate_images, load_generator, pick_generator
from src.sample import main
from src.training import generator_payload

# Raw-RGB generators (palette_size 0); the palette has its own test at the end.
PARAMS = parse_params({"model": {"latent_dim": 16, "gen_filters": 8, "disc_filters": 8, "palette_size": 0},
                       "train": {"init": "dcgan"}})


@pytest.fixture
def generator_file(tmp_path):
    torch.manual_seed(0)
    gen = Generator(16, 8, init="dcgan")
    gen(torch.randn(8, 16, 1, 1))  # move BN statistics off their defaults
    path = tmp_path / "models" / "generator.pt"
    save_torch_atomic(path, generator_payload(cpu_state(gen), PARAMS, step=7, kind="generator"))
    return path, gen.eval()


def test_load_generator_round_trip(generator_file):
    path, original = generator_file
    loaded, meta = load_generator(path)
    assert not loaded.training
    assert meta["latent_dim"] == 16 and meta["step"] == 7 and meta["image_shape"] == [3, 64, 64]
    assert meta["params"]["model.gen_filters"] == 8
    z = torch.randn(4, 16, 1, 1)
    assert torch.equal(loaded(z), original(z))


def test_generate_images_is_deterministic_uint8_and_batch_independent(generator_file):
    gen, _ = load_generator(generator_file[0])
    a = generate_images(gen, 10, latent_dim=16, seed=5, device="cpu", batch_size=3)
    b = generate_images(gen, 10, latent_dim=16, seed=5, device="cpu", batch_size=256)
    c = generate_images(gen, 10, latent_dim=16, seed=6, device="cpu")
    assert a.dtype == torch.uint8 and a.shape == (10, 3, 64, 64) and a.device.type == "cpu"
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_missing_and_corrupt_files_are_user_errors(tmp_path, generator_file):
    with pytest.raises(GeneratorFileError, match="no generator at .*dvc repro train"):
        load_generator(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(GeneratorFileError, match="not a readable generator file"):
        load_generator(garbage)
    other = tmp_path / "other.pt"
    torch.save({"kind": "discriminator", "state_dict": {}}, other)
    with pytest.raises(GeneratorFileError, match="not a generator written by src.train"):
        load_generator(other)
    payload = torch.load(generator_file[0], weights_only=True)
    payload["model"]["filters"] = 4
    torch.save(payload, other)
    with pytest.raises(GeneratorFileError, match="does not match the Generator architecture"):
        load_generator(other)
    assert issubclass(GeneratorFileError, UserError)


def test_cli_writes_a_grid_and_a_folder(generator_file, tmp_path, monkeypatch):
    path, _ = generator_file
    monkeypatch.chdir(tmp_path)
    assert pick_generator() == path.relative_to(tmp_path)  # no EMA file: the plain generator
    grid = main(["--n", "6", "--out", str(tmp_path / "grid.png"), "--grid", "--nrow", "3", "--device", "cpu"])
    assert Image.open(grid).size == (3 * 66 + 2, 2 * 66 + 2)  # 64 px tiles, 2 px padding
    folder = main(["--n", "5", "--out", str(tmp_path / "imgs"), "--model", str(path), "--seed", "1", "--device", "cpu"])
    files = sorted(folder.glob("*.png"))
    assert [f.name for f in files] == [f"{i:04d}.png" for i in range(5)]
    assert sorted(f.name for f in folder.iterdir()) == [".atari-gan-samples", *(f.name for f in files)]
    expected = generate_images(load_generator(path)[0], 5, latent_dim=16, seed=1, device="cpu")
    first = np.asarray(Image.open(files[0]))
    assert np.array_equal(first, expected[0].permute(1, 2, 0).numpy())  # PNG keeps the exact pixels
    again = main(["--n", "2", "--out", str(folder), "--model", str(path), "--device", "cpu"])  # its own: replaced
    assert sorted(f.name for f in again.glob("*.png")) == ["0000.png", "0001.png"]
    with pytest.raises(UserError, match="add --grid"):
        main(["--out", str(tmp_path / "x.png")])


def test_conditional_generator_draws_the_mix_or_one_game(tmp_path, monkeypatch):
    params = parse_params({"model": {"latent_dim": 16, "gen_filters": 8, "conditional": True, "palette_size": 0}})
    torch.manual_seed(0)
    gen = Generator(16, 8, num_classes=3)
    gen.class_freq.copy_(torch.tensor([0.5, 0.25, 0.25]))
    path = tmp_path / "g.pt"
    save_torch_atomic(path, generator_payload(cpu_state(gen), params, step=1, kind="generator"))
    loaded, meta = load_generator(path)
    assert torch.equal(loaded.class_freq, gen.class_freq)
    mixed = generate_images(loaded, 9, latent_dim=16, seed=1, device="cpu", batch_size=2)
    assert torch.equal(mixed, generate_images(loaded, 9, latent_dim=16, seed=1, device="cpu"))  # batch-independent
    pong = generate_images(loaded, 9, latent_dim=16, seed=1, device="cpu", game=2)
    assert not torch.equal(mixed, pong)
    out = main(["--n", "4", "--grid", "--out", str(tmp_path / "pong.png"), "--model", str(path), "--game", "Pong-v4"])
    assert out.is_file()
    with pytest.raises(UserError, match="--game 'Tetris-v4': this generator knows Breakout-v4, AirRaid-v4, Pong-v4"):
        main(["--n", "4", "--grid", "--out", str(tmp_path / "x.png"), "--model", str(path), "--game", "Tetris-v4"])


def test_game_needs_a_conditional_generator(generator_file, tmp_path):
    with pytest.raises(UserError, match="--game needs a generator trained with model.conditional: true"):
        main(["--n", "2", "--grid", "--out", str(tmp_path / "x.png"), "--model", str(generator_file[0]),
              "--game", "Pong-v4"])


def test_palette_generator_file_keeps_its_palette(tmp_path):
    params = parse_params({"model": {"latent_dim": 16, "gen_filters": 8, "palette_size": 4}})
    torch.manual_seed(0)
    gen = Generator(16, 8, palette_size=4)
    gen.palette.copy_(torch.tensor([[-1.0, -1, -1], [1, 1, 1], [1, -1, -1], [-1, 1, 1]]))
    path = tmp_path / "g.pt"
    save_torch_atomic(path, generator_payload(cpu_state(gen), params, step=1, kind="generator"))
    loaded, _ = load_generator(path)
    assert torch.equal(loaded.palette, gen.palette)
    images = generate_images(loaded, 3, latent_dim=16, seed=0, device="cpu")
    colours = {tuple(c) for c in images.permute(0, 2, 3, 1).reshape(-1, 3).tolist()}
    assert colours <= {(0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 255, 255)}


def test_cli_draws_the_generator_evaluate_scores_and_says_which(tmp_path, monkeypatch, capsys):
    from src.generator import GENERATOR_FILES

    models = tmp_path / "models"
    for seed, name in enumerate(reversed(GENERATOR_FILES)):  # generator.pt, generator_ema.pt, generator_best.pt
        torch.manual_seed(seed)
        gen = Generator(16, 8, init="dcgan")
        save_torch_atomic(models / name, generator_payload(cpu_state(gen), PARAMS, step=seed, kind="generator"))
    monkeypatch.chdir(tmp_path)
    for name in GENERATOR_FILES:  # best first, as evaluate picks; then EMA; then the last
        out = main(["--n", "3", "--out", f"s-{name}", "--device", "cpu"])
        assert f"from models/{name}" in capsys.readouterr().out
        expected = generate_images(load_generator(models / name)[0], 3, latent_dim=16, seed=0, device="cpu")
        drawn = np.asarray(Image.open(out / "0000.png"))
        assert np.array_equal(drawn, expected[0].permute(1, 2, 0).numpy())
        (models / name).unlink()

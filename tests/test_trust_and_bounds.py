"""Reliability, round three (issue 33, items 1-7): code runs only when the user asked for it, and small inputs get
bounded memory and time. Each test names the behaviour it checks and fails on the code before the fix."""

import http.server
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from conftest import GOLDEN
from PIL import Image, ImageFile

import navil
from navil import image_loading_navil
from navil.configuration_navil import CODE_FILES
from navil.image_processing_navil import NaViLImageProcessor
from navil.modeling_navil import NaViLForConditionalGeneration
from navil.tools import cli
from navil.tools.convert import convert_checkpoint
from navil.tools.loading import auto_map_modules, load_navil_processor

EMBEDDED = Path(navil.__file__).parent / "checkpoints" / "navil-tiny"
EXAMPLES = Path(navil.__file__).parent / "examples" / "finetune"

# -- 1. which code runs ----------------------------------------------------------------------------------------------


def hostile_module(marker: Path) -> str:
    """Python source that leaves `marker` behind when it is imported."""
    return f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture
def hostile_folder(tmp_path):
    """A copy of the embedded model whose own modeling, processing, configuration, image processing and tokenizer
    files write a marker file when imported (the tokenizer's code named by its tokenizer_config.json auto_map)."""
    folder, marker = tmp_path / "model", tmp_path / "marker"
    shutil.copytree(EMBEDDED, folder)
    for name in CODE_FILES:
        (folder / name).write_text(hostile_module(marker))
    (folder / "tokenization_evil.py").write_text(hostile_module(marker))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"]["AutoTokenizer"] = [
        "tokenization_evil.EvilTokenizer",
        "tokenization_evil.EvilTokenizer",
    ]
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder, marker


@pytest.mark.parametrize("command", ["chat", "eval"])
def test_navil_chat_and_eval_run_none_of_the_model_folders_code(hostile_folder, command, capsys):
    folder, marker = hostile_folder
    if command == "chat":
        cli.main(["chat", "--model", str(folder), "--max-new-tokens", "2", "Hi"])
    else:
        cli.main(["eval", "--model", str(folder), "--num-questions", "1", "--batch-size", "1", "--quiet"])
    assert capsys.readouterr().out
    assert not marker.exists()


def test_navil_finetune_runs_none_of_the_model_folders_code(hostile_folder, tmp_path):
    folder, marker = hostile_folder
    data = tmp_path / "train.jsonl"
    data.write_text((EXAMPLES / "train.jsonl").read_text().splitlines()[0] + "\n")
    shutil.copy(EXAMPLES / "shapes_0.png", tmp_path / "shapes_0.png")
    output = tmp_path / "tuned"
    cli.main(
        ["finetune", "--model", str(folder), "--data", str(data), "--output-dir", str(output), "--max-steps", "1"]
        + ["--eval-fraction", "0", "--batch-size", "1", "--quiet"]
    )
    assert not marker.exists()
    assert (output / "model.safetensors").is_file()


def test_trust_remote_code_runs_the_folders_own_code_and_only_with_the_flag(hostile_folder):
    folder, marker = hostile_folder
    with pytest.raises(AttributeError):  # the hostile module defines no model class
        cli.main(["chat", "--model", str(folder), "--trust-remote-code", "--max-new-tokens", "2", "Hi"])
    assert marker.read_text() == "ran"


@pytest.mark.parametrize(
    "reference",
    [
        "{elsewhere}--modeling_navil.NaViLForConditionalGeneration",
        "../x--modeling_navil.NaViLForConditionalGeneration",
    ],
)
def test_an_auto_map_pointing_outside_the_folder_is_refused_even_with_trust_remote_code(tmp_path, reference):
    folder, elsewhere, marker = tmp_path / "model", tmp_path / "elsewhere", tmp_path / "marker"
    shutil.copytree(EMBEDDED, folder)
    elsewhere.mkdir()
    (elsewhere / "modeling_navil.py").write_text(hostile_module(marker))
    (elsewhere / "config.json").write_text((EMBEDDED / "config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModel"] = reference.format(elsewhere=elsewhere)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="points outside .* never runs such code, even with --trust-remote-code"):
        cli.main(["chat", "--model", str(folder), "--trust-remote-code", "--max-new-tokens", "2", "Hi"])
    assert not marker.exists()


def test_auto_map_paths_are_refused_and_local_modules_listed(tmp_path):
    shutil.copytree(EMBEDDED, tmp_path / "model")
    assert auto_map_modules(tmp_path / "model")["modeling_navil.py"] == "config.json"
    edit_json(tmp_path / "model" / "preprocessor_config.json", auto_map={"AutoImageProcessor": "../evil.X"})
    with pytest.raises(ValueError, match="preprocessor_config.json has an auto_map entry '../evil.X'"):
        auto_map_modules(tmp_path / "model")


def test_navil_convert_runs_and_copies_none_of_the_tokenizers_code(tmp_path):
    tokenizer, marker = tmp_path / "tokenizer", tmp_path / "marker"
    shutil.copytree(GOLDEN / "tokenizer", tokenizer)
    (tokenizer / "tokenization_evil.py").write_text(hostile_module(marker))
    edit_json(
        tokenizer / "tokenizer_config.json",
        auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]},
    )
    out = tmp_path / "converted"
    cli.main(["convert", str(GOLDEN / "qwen3_ve"), str(out), "--tokenizer", str(tokenizer)])
    assert not marker.exists()
    assert sorted(path.name for path in out.glob("*.py")) == sorted(CODE_FILES)
    assert "AutoTokenizer" not in json.loads((out / "tokenizer_config.json").read_text()).get("auto_map", {})


def test_convert_with_trust_remote_code_keeps_the_tokenizers_own_code(tmp_path):
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(GOLDEN / "tokenizer", tokenizer)
    (tokenizer / "tokenization_navil_test.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\nclass TestTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    reference = "tokenization_navil_test.TestTokenizer"
    edit_json(tokenizer / "tokenizer_config.json", auto_map={"AutoTokenizer": [None, reference]})
    out = convert_checkpoint(GOLDEN / "qwen3_ve", tmp_path / "out", tokenizer, verify=False, trust_remote_code=True)
    assert (out / "tokenization_navil_test.py").is_file()


# -- 2. image URLs: a byte cap and one deadline -----------------------------------------------------------------------


@pytest.fixture
def hostile_server():
    """A server on 127.0.0.1 whose /endless sends a 100 MiB body (in 64 KiB chunks: endless for a 1 MB cap) and whose
    /drip sends 12 bytes, one a second; its threads end when the client goes away."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            chunk, pause, count = (
                (b"\x89PNG\r\n\x1a\n" * 8192, 0, 1600) if self.path == "/endless" else (b"\x89", 1, 12)
            )
            try:
                for _ in range(count):
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    time.sleep(pause)
            except OSError:  # the client closed the connection
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_endless_image_url_body_is_refused_at_the_byte_cap_derived_from_max_image_pixels(hostile_server):
    processor = NaViLImageProcessor(max_image_pixels=10_000)
    start = time.monotonic()
    with pytest.raises(ValueError, match="larger than 1088576 bytes, more than an image of max_image_pixels"):
        processor(f"{hostile_server}/endless")
    assert time.monotonic() - start < 10


def test_a_dripping_image_url_is_refused_at_one_overall_deadline(hostile_server, monkeypatch):
    monkeypatch.setattr(image_loading_navil, "DOWNLOAD_DEADLINE_S", 3.0)
    start = time.monotonic()
    with pytest.raises(ValueError, match="Could not download the image at .*/drip: .*3 s"):
        NaViLImageProcessor()(f"{hostile_server}/drip")
    assert 2.5 < time.monotonic() - start < 6


# -- 3. paths that are not regular files ------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_given_as_an_image_path_is_refused_at_once(tmp_path):
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(ValueError, match="is not a regular file \\(a FIFO, socket or device\\)"):
        NaViLImageProcessor()(str(fifo))
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("path, message", [("/dev/zero", "not a regular file"), (".", "is a directory")])
def test_devices_and_directories_given_as_image_paths_are_refused(path, message):
    with pytest.raises(ValueError, match=message):
        NaViLImageProcessor()(path)


# -- 5. saved image processor settings may only tighten the bounds --------------------------------------------------


@pytest.mark.parametrize(
    "saved, field",
    [
        (dict(max_patches_per_scale=None, max_patches_per_call=None, min_pixels=4e8, max_pixels=1e9), "max_pixels"),
        (dict(max_patches_per_scale=None), "max_patches_per_scale"),
        (dict(max_patches_per_call=10**9), "max_patches_per_call"),
        (dict(max_image_pixels=None), "max_image_pixels"),
        (dict(max_images_per_call=10**6), "max_images_per_call"),
    ],
)
def test_a_saved_preprocessor_config_cannot_remove_or_raise_a_bound(tmp_path, saved, field):
    folder = shutil.copytree(EMBEDDED, tmp_path / "model")
    edit_json(folder / "preprocessor_config.json", **saved)
    with pytest.raises(ValueError, match=f"set {field}=.* navil's bound .* a saved file may only lower it"):
        NaViLImageProcessor.from_pretrained(folder)
    with pytest.raises(ValueError, match=f"set {field}="):
        load_navil_processor(folder)


def test_a_saved_preprocessor_config_may_tighten_the_bounds_and_the_80x64_image_stays_bounded(tmp_path):
    folder = shutil.copytree(EMBEDDED, tmp_path / "model")
    edit_json(folder / "preprocessor_config.json", min_pixels=10**6, max_pixels=10**6, max_patches_per_scale=1000)
    processor = NaViLImageProcessor.from_pretrained(folder)
    assert processor.max_patches_per_scale == 1000
    with pytest.raises(ValueError, match="more than max_patches_per_scale=1000"):
        processor(Image.new("RGB", (80, 64)))


def test_only_the_callers_own_argument_removes_a_bound(tmp_path):
    folder = shutil.copytree(EMBEDDED, tmp_path / "model")
    edit_json(folder / "preprocessor_config.json", max_patches_per_scale=None)
    processor = NaViLImageProcessor.from_pretrained(folder, max_patches_per_scale=None)
    assert processor.max_patches_per_scale is None


# -- 6. containers that embed a huge image --------------------------------------------------------------------------


def ico_embedding(png: bytes) -> bytes:
    """An ICO whose one directory entry says 16x16 but whose data is `png`."""
    directory = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + directory + png


def one_colour_png(width: int, height: int) -> bytes:
    """A grey PNG written row by row: a 12000x12000 one compresses to tens of KB without a full-size image."""
    compressor, parts = zlib.compressobj(9), []
    line = b"\x00" + b"\x80" * width
    for _ in range(height):
        parts.append(compressor.compress(line))
    parts.append(compressor.flush())

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def huge_png():
    return one_colour_png(12000, 12000)


@pytest.fixture
def decoded_sizes(monkeypatch):
    """The sizes of the images PIL decodes (`ImageFile.load`) during a test."""
    sizes, load = [], ImageFile.ImageFile.load

    def recording_load(image):
        sizes.append(image.size)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    return sizes


def test_an_ico_embedding_a_huge_png_is_refused_before_it_is_decoded(huge_png, tmp_path, decoded_sizes):
    assert len(huge_png) < 300_000
    path = tmp_path / "icon.ico"
    path.write_bytes(ico_embedding(huge_png))
    for source in (str(path), path.read_bytes()):
        with pytest.raises(ValueError, match="12000x12000 = 144000000 pixels.*refused before decoding"):
            NaViLImageProcessor()(source)
    assert (12000, 12000) not in decoded_sizes


def test_an_icns_embedding_a_huge_png_is_refused_before_it_is_decoded(huge_png, decoded_sizes):
    block = b"ic07" + struct.pack(">I", 8 + len(huge_png)) + huge_png  # ic07: a 128x128 image, it says
    icns = b"icns" + struct.pack(">I", 8 + len(block)) + block
    with pytest.raises(ValueError, match="12000x12000 = 144000000 pixels.*refused before decoding"):
        NaViLImageProcessor()(icns)
    assert (12000, 12000) not in decoded_sizes


def test_a_decoded_pil_image_over_the_limit_is_not_said_to_be_refused_before_decoding():
    image = Image.new("RGB", (200, 100))
    with pytest.raises(ValueError, match="refused after decoding") as error:
        NaViLImageProcessor(max_image_pixels=10_000)(image)
    assert "before decoding" not in str(error.value)


def test_a_small_ico_still_loads():
    file = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(file, format="ICO", sizes=[(32, 32)])
    outputs = NaViLImageProcessor(multiscale=False)(file.getvalue(), return_tensors="pt")
    assert outputs["pixel_values"][:, 0].max() > 0.5  # the red channel of the first patch


# -- 7. a stream left open when the program ends ----------------------------------------------------------------------

OPEN_STREAM_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from conftest import GOLDEN, load_golden_model
from navil.processing_navil import load_navil_tokenizer

tokenizer = load_navil_tokenizer(GOLDEN / "tokenizer")
model = load_golden_model("qwen3_ve", tokenizer)
settings = dict(max_new_tokens=20000, min_new_tokens=20000, do_sample=False)
stream = model.stream_chat(tokenizer, None, "Tell me a long story.", settings)
next(stream)
print("first chunk", time.monotonic(), flush=True)
"""


def test_a_stream_left_open_does_not_keep_the_program_running():
    script = OPEN_STREAM_SCRIPT.format(tests=str(Path(__file__).parent))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    end = time.monotonic()
    assert result.returncode == 0, result.stderr[-2000:]
    first_chunk = float(result.stdout.split("first chunk")[1])
    assert end - first_chunk < 10  # generating the 20000 tokens takes minutes


# -- 4. config sizes against the weight files and the memory ---------------------------------------------------------


def folder_with_config(tmp_path, section: str, **changes) -> Path:
    """The golden Qwen3-VE checkpoint (an original config: its text_config is `llm_config`) with `changes`."""
    folder = shutil.copytree(GOLDEN / "qwen3_ve", tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["llm_config" if section == "text_config" else section].update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "section, field, value, message",
    [
        ("text_config", "vocab_size", 5_000_000, "stores language_model.model.embed_tokens.weight with shape"),
        ("text_config", "num_hidden_layers", 30, "the weight files hold 4 layers"),
        ("vision_config", "intermediate_size", 4096, "stores vision_model.encoder.layers.0.mlp.fc1.weight"),
    ],
)
def test_config_sizes_that_the_weight_headers_contradict_are_refused_before_allocating(
    tmp_path, section, field, value, message
):
    folder = folder_with_config(tmp_path, section, **{field: value})
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"says {section}.{field} = {value}, but .*{message}"):
        NaViLForConditionalGeneration.from_pretrained(folder)
    assert time.monotonic() - start < 5


def test_a_config_too_large_for_the_memory_is_refused_naming_the_field_even_when_not_strict(tmp_path):
    folder = folder_with_config(tmp_path, "text_config", hidden_size=10**12, head_dim=16)
    with pytest.raises(
        ValueError, match="more than the .* GiB of memory available.*text_config: .*hidden_size = 1000000000000"
    ):
        NaViLForConditionalGeneration.from_pretrained(folder, strict=False)

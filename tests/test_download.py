"""Where WikiText-2 comes from: a folder, an archive, TFDS's manual dir or a download; always hash-checked."""

import hashlib
import http.server
import pathlib
import shutil
import socket
import threading
import zipfile

import pytest

from gpt2_jax import data

FILES = ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")


@pytest.fixture(autouse=True)
def _no_data_dir_env(monkeypatch):
    """These tests choose the source themselves; CI's GPT2_JAX_DATA_DIR must not leak in."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)


@pytest.fixture(scope="module")
def archive(wikitext_dir, tmp_path_factory) -> pathlib.Path:
    """A zip laid out like the official one (files inside a wikitext-2/ folder)."""
    path = tmp_path_factory.mktemp("zip") / "wikitext-2-v1.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name in FILES:
            zf.write(wikitext_dir / name, f"wikitext-2/{name}")
    return path


@pytest.fixture(scope="module")
def expected_valid(wikitext_dir) -> bytes:
    return (wikitext_dir / "wiki.valid.tokens").read_bytes()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/wikitext-2-v1.zip"  # nothing listens there any more


class _Server:
    """Serves one body at /wikitext-2-v1.zip on 127.0.0.1 and records each request's User-Agent."""

    def __init__(self, body: bytes):
        self.body, self.user_agents = body, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.user_agents.append(self.headers.get("User-Agent"))
                if self.path != "/wikitext-2-v1.zip":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/wikitext-2-v1.zip"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _text(lines) -> bytes:
    return "".join(lines).encode("utf-8")


def test_folder_with_the_three_files_is_read_and_verified(wikitext_dir, tmp_path, expected_valid):
    lines = data.load_split_lines("validation", wikitext_dir, tfds_dir=tmp_path / "tfds")
    assert _text(lines) == expected_valid


def test_environment_variable_names_the_data_dir(wikitext_dir, tmp_path, monkeypatch, expected_valid):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(wikitext_dir))
    lines = data.load_split_lines("validation", tfds_dir=tmp_path / "tfds", download_url=_closed_port_url())
    assert _text(lines) == expected_valid


@pytest.mark.slow
def test_archive_or_folder_holding_the_archive_is_read(archive, tmp_path, expected_valid):
    assert _text(data.load_split_lines("validation", archive, tfds_dir=tmp_path / "a")) == expected_valid
    assert _text(data.load_split_lines("validation", archive.parent, tfds_dir=tmp_path / "b")) == expected_valid


@pytest.mark.slow
def test_tfds_manual_dir_is_used_when_no_data_dir_is_given(archive, tmp_path, expected_valid):
    manual = tmp_path / "tfds" / "downloads" / "manual"
    manual.mkdir(parents=True)
    shutil.copy(archive, manual)
    lines = data.load_split_lines("validation", tfds_dir=tmp_path / "tfds", download_url=_closed_port_url())
    assert _text(lines) == expected_valid


@pytest.mark.slow
def test_download_from_local_http_server_with_browser_user_agent(archive, tmp_path, expected_valid):
    with _Server(archive.read_bytes()) as server:
        lines = data.load_split_lines("validation", tfds_dir=tmp_path / "tfds", download_url=server.url)
        # Prepared once: the other splits come from the array_record files, with no new request.
        train = data.load_split_lines("train", tfds_dir=tmp_path / "tfds", download_url=server.url)
    assert _text(lines) == expected_valid
    assert len(train) == 36_718
    assert len(server.user_agents) == 1
    assert server.user_agents[0].startswith("Mozilla/5.0")  # not Python-urllib, which some hosts reject


def test_corrupt_download_is_rejected_and_not_kept(wikitext_dir, tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        for name in FILES:
            body = (wikitext_dir / name).read_bytes()
            zf.writestr(f"wikitext-2/{name}", body.replace(b"Valkyria", b"Valkyrie") if "train" in name else body)
    with _Server(bad.read_bytes()) as server:
        with pytest.raises(data.DataError, match=r"wiki\.train\.tokens from http://127\.0\.0\.1.*SHA256"):
            data.load_split_lines("train", tfds_dir=tmp_path / "tfds", download_url=server.url)
    assert not list((tmp_path / "tfds" / "downloads").glob("*.zip"))


def test_checksum_mismatch_is_one_line_error_saying_how_to_provide_the_data(wikitext_dir, tmp_path):
    folder = tmp_path / "wikitext-2"
    folder.mkdir()
    for name in FILES:
        shutil.copy(wikitext_dir / name, folder)
    with open(folder / "wiki.valid.tokens", "ab") as f:
        f.write(b" extra \n")
    expected = hashlib.sha256((folder / "wiki.valid.tokens").read_bytes()).hexdigest()
    with pytest.raises(data.DataError) as e:
        data.load_split_lines("test", folder, tfds_dir=tmp_path / "tfds")
    message = str(e.value)
    assert "\n" not in message
    assert f"wiki.valid.tokens from --data_dir={folder} has SHA256 {expected}" in message
    assert "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8" in message  # the known-good one
    assert "--data_dir=FOLDER" in message and data.DATA_DIR_ENV in message
    # Nothing was prepared from the bad files.
    assert not list((tmp_path / "tfds").rglob("*.array_record*"))


def test_missing_data_without_network_says_how_to_provide_it_offline(tmp_path):
    with pytest.raises(data.DataError) as e:
        data.load_split_lines("train", tfds_dir=tmp_path / "tfds", download_url=_closed_port_url())
    message = str(e.value)
    assert "\n" not in message
    assert "downloading http://127.0.0.1" in message
    assert ("put wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens (or wikitext-2-v1.zip from "
            "https://wikitext.smerity.com/wikitext-2-v1.zip) in a folder and pass --data_dir=FOLDER "
            f"or set {data.DATA_DIR_ENV}=FOLDER") in message


def test_data_dir_lacking_the_files_is_an_error_not_a_download(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataError, match=r"holds neither wiki\.train\.tokens.*--data_dir=FOLDER"):
        data.load_split_lines("train", empty, tfds_dir=tmp_path / "tfds")
    with pytest.raises(data.DataError, match=r"does not exist.*--data_dir=FOLDER"):
        data.load_split_lines("train", tmp_path / "typo", tfds_dir=tmp_path / "tfds")


def test_raw_variant_asks_for_its_own_files_and_archive(tmp_path):
    with pytest.raises(data.DataError) as e:
        data.load_split_lines("train", tmp_path, variant="wikitext-2-raw-v1", tfds_dir=tmp_path / "tfds")
    assert ("put wiki.train.raw, wiki.valid.raw, wiki.test.raw (or wikitext-2-raw-v1.zip from "
            "https://wikitext.smerity.com/wikitext-2-raw-v1.zip)") in str(e.value)


def test_raw_variant_rejects_the_tokenized_files_under_raw_names(wikitext_dir, tmp_path):
    for name in FILES:
        shutil.copy(wikitext_dir / name, tmp_path / name.replace(".tokens", ".raw"))
    with pytest.raises(data.DataError, match=r"wiki\.train\.raw from .* has SHA1 .*not the known-good "
                                             r"d33faf256327882db0edc7c67cd098d1051a2112 of wikitext-2-raw-v1"):
        data.load_split_lines("train", tmp_path, variant="wikitext-2-raw-v1", tfds_dir=tmp_path / "tfds")

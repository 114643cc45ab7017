"""Cluster keys: folders made by 'periphery keys init', loading, and the --keys/--insecure rule."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from periphery_core.cluster.keys import (
    KeysError,
    init_cluster_keys,
    keyring_or_insecure,
    load_keyring,
)


def test_init_writes_one_folder_per_host_trusting_each_by_role(tmp_path: Path) -> None:
    folders = init_cluster_keys(tmp_path / "k", ["master"], ["node1", "node2"])
    rings = [load_keyring(f) for f in folders]
    publics = [r.public for r in rings]
    assert len(set(publics)) == 3
    for r in rings:
        assert r.masters == {publics[0]} and r.nodes == set(publics[1:])
        assert len(r.secret) == 40 and r.secret != r.public
    for folder in folders:
        secret = folder / f"{folder.name}.key_secret"
        assert oct(secret.stat().st_mode & 0o777) == "0o600"
        assert oct(folder.stat().st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("masters,nodes", [([], ["n"]), (["m"], []), (["a"], ["a"]),
                                           (["m"], ["../x"]), (["m"], [".hidden"])])
def test_bad_host_names_are_refused(tmp_path: Path, masters: list[str], nodes: list[str]) -> None:
    with pytest.raises(KeysError):
        init_cluster_keys(tmp_path / "k", masters, nodes)


def test_existing_folders_are_not_overwritten(tmp_path: Path) -> None:
    init_cluster_keys(tmp_path, ["m"], ["node1"])
    with pytest.raises(KeysError, match="exists already"):
        init_cluster_keys(tmp_path, ["m2"], ["node1"])


def test_a_secret_key_others_can_read_is_refused(tmp_path: Path) -> None:
    folder = init_cluster_keys(tmp_path / "k", ["m"], ["n"])[1]
    (folder / "n.key_secret").chmod(0o644)
    with pytest.raises(KeysError, match="chmod 600"):
        load_keyring(folder)


def test_a_key_folder_from_before_roles_says_to_make_new_ones(tmp_path: Path) -> None:
    folder = init_cluster_keys(tmp_path / "k", ["m"], ["n"])[1]
    (folder / "masters").rename(folder / "allowed")
    with pytest.raises(KeysError, match="before roles"):
        load_keyring(folder)


def test_load_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(KeysError, match="not found"):
        load_keyring(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeysError, match="exactly one"):
        load_keyring(tmp_path / "empty")
    folder = init_cluster_keys(tmp_path / "k", ["m"], ["n"])[1]
    for cert in [*(folder / "masters").iterdir(), *(folder / "nodes").iterdir()]:
        cert.unlink()
    with pytest.raises(KeysError, match="trusts no master and no node"):
        load_keyring(folder)


def test_keys_or_insecure_must_be_explicit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PERIPHERY_KEYS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(KeysError, match="--insecure"):
        keyring_or_insecure(None, False)
    assert keyring_or_insecure(None, True) is None
    folder = init_cluster_keys(tmp_path / "k", ["m"], ["n"])[0]
    with pytest.raises(KeysError, match="not both"):
        keyring_or_insecure(folder, True)
    monkeypatch.setenv("PERIPHERY_KEYS", str(folder))
    ring = keyring_or_insecure(None, False)
    assert ring is not None and ring.name == "m"


def test_cli_keys_init_and_a_node_refusing_to_start_without_keys(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PERIPHERY_KEYS"}
    env["HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-m", "periphery_core.cli.main", "keys", "init",
                          str(tmp_path / "keys"), "--master", "master", "--node", "node1"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "keys" / "node1" / "node1.key_secret").is_file()
    node = subprocess.run([sys.executable, "-m", "periphery_core.cli.node", "--port", "0",
                           "--no-advertise"], capture_output=True, text=True, env=env,
                          timeout=30)
    assert node.returncode == 2
    lines = [ln for ln in node.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "periphery keys init" in lines[0] and "Traceback" not in node.stderr


def test_the_default_key_folder_is_in_the_config_folder_and_no_test_sees_the_user_s(
        tmp_path: Path) -> None:
    """`periphery cluster ls` without --keys: with no keys in the config folder, one line that
    says how to make them and where they may go; with a host's folder copied there, it runs
    secured (and reports the node it cannot reach). The suite itself runs on a config folder
    of its own, never the user's, whose keys would secure runs tests expect to refuse."""
    import shutil

    from periphery_core.config_dir import CONFIG_ENV, config_dir

    assert config_dir() != Path.home() / ".config" / "periphery"
    assert "PERIPHERY_KEYS" not in os.environ
    env = {**os.environ, CONFIG_ENV: str(tmp_path / "config")}

    def cluster_ls() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "periphery_core.cli.main", "cluster", "ls",
                               "--no-mdns", "--peer", "127.0.0.1:9", "--json"],
                              capture_output=True, text=True, env=env, timeout=60)

    refused = cluster_ls()
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (line,) = [ln for ln in refused.stderr.splitlines() if ln.strip()]
    assert "periphery keys init DIR --master NAME --node NAME" in line
    assert str(tmp_path / "config" / "keys") in line and "--insecure" in line
    folder = init_cluster_keys(tmp_path / "k", ["master"], ["node1"])[0]
    shutil.copytree(folder, tmp_path / "config" / "keys")
    secured = cluster_ls()
    assert secured.returncode == 0, secured.stderr
    assert "INSECURE" not in secured.stderr and "127.0.0.1:9" in secured.stdout

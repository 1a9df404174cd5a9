"""The shipped snapshotters for real: PostgreSQL, MariaDB and SQLite dumped by `archive`, restored
through `restore --snapshot` and the restore-through command each recorded, and compared.

PostgreSQL and MariaDB: Debian's server packages (`.ci/run` installs them). Each server is started by
the test in a temporary directory, as an unprivileged user, on a free loopback port, with no password.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sysbackup_local.ports import free_port
from sysbackup_local.stack import LocalHost
from test_archive_restore import cli

EXAMPLES = Path(__file__).resolve().parents[2] / "uploader" / "examples" / "snapshots.d"
PG_SUPERUSER = "postgres"


def install_snapshotter(host: LocalHost, example: str, name: str | None = None) -> Path:
    target = host.config_dir / "snapshots.d" / (name or example)
    shutil.copy2(EXAMPLES / example, target)
    return target


def use_cache_dir(host: LocalHost, cache_dir: Path) -> None:
    conf = host.config_dir / "conf"
    conf.write_text(conf.read_text().replace("[content]\n", f"[content]\ncache_dir = {cache_dir}\n"))


def archive(host: LocalHost, stats_file: Path) -> dict:
    archived = cli(host.config_dir, "archive", "-q", "--stats-json", str(stats_file))
    assert archived.returncode == 0, archived.stderr
    return json.loads(stats_file.read_text())


def restore_snapshot(host: LocalHost, name: str) -> subprocess.CompletedProcess[str]:
    return cli(host.config_dir, "restore", "latest", "--snapshot", name)


# -- PostgreSQL -----------------------------------------------------------------------------------


def postgres_bin_dir() -> Path | None:
    """Debian's server binaries (newest version), else initdb on PATH."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if debian:
        return debian[-1].parent
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


@dataclass
class PostgresCluster:
    data_dir: Path
    port: int
    bin_dir: Path
    run_as: list[str]  # `runuser -u postgres --` when we are root: the server refuses to run as root

    @property
    def env(self) -> dict[str, str]:
        return {"PGHOST": "127.0.0.1", "PGPORT": str(self.port), "PGUSER": PG_SUPERUSER}

    def sql(self, statement: str, database: str = "postgres") -> str:
        done = subprocess.run(
            ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", database, "-c", statement],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def stop(self) -> None:
        subprocess.run(
            [*self.run_as, str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )


@pytest.fixture
def start_postgres() -> Iterator[Callable[[], PostgresCluster]]:
    bin_dir = postgres_bin_dir()
    if bin_dir is None or shutil.which("psql") is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    run_as = ["runuser", "-u", PG_SUPERUSER, "--"] if os.geteuid() == 0 else []
    started: list[tuple[PostgresCluster, Path]] = []

    def start() -> PostgresCluster:
        top = Path(tempfile.mkdtemp(prefix="s3sb-pg-", dir="/var/tmp"))  # reachable by the server user
        if run_as:
            shutil.chown(top, PG_SUPERUSER)
        cluster = PostgresCluster(top / "data", free_port(), bin_dir, run_as)
        subprocess.run(
            [*run_as, str(bin_dir / "initdb"), "-D", str(cluster.data_dir), "-U", PG_SUPERUSER,
             "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        started.append((cluster, top))
        options = (
            f"-p {cluster.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off"
        )
        subprocess.run(
            [*run_as, str(bin_dir / "pg_ctl"), "-D", str(cluster.data_dir), "-o", options,
             "-l", str(top / "server.log"), "-w", "-t", "60", "start"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        return cluster

    yield start
    for cluster, top in started:
        cluster.stop()
        shutil.rmtree(top, ignore_errors=True)


# CREATE DATABASE cannot share a transaction (one psql -c) with anything: one statement per call.
SHOP_SETUP = ("CREATE ROLE shop_owner LOGIN PASSWORD 'not-a-secret'", "CREATE DATABASE shop OWNER shop_owner")
SHOP_DATA = """
SET ROLE shop_owner;
CREATE TABLE customers (id integer PRIMARY KEY, name text NOT NULL, email text, joined timestamptz);
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES customers (id),
    amount numeric(12, 2) NOT NULL,
    note text,
    payload bytea
);
CREATE VIEW big_spenders AS SELECT customer_id, sum(amount) AS total FROM orders GROUP BY customer_id;
INSERT INTO customers
    SELECT g, 'customer ' || g || E' with \\t tab and ''quote''', 'c' || g || '@example.com',
           timestamptz '2020-01-01' + g * interval '17 minutes'
    FROM generate_series(1, 20000) AS g;
INSERT INTO orders (customer_id, amount, note, payload)
    SELECT 1 + (g * 7919) % 20000, (g % 1000) * 1.25, repeat('n', g % 50), decode(md5(g::text), 'hex')
    FROM generate_series(1, 60000) AS g;
"""
TABLE_CHECKSUM = (
    "SELECT count(*) || ' ' || md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {} AS t"
)


def shop_fingerprint(cluster: PostgresCluster) -> dict[str, str]:
    """Row count and a checksum of every row of each table, the view, the owner and the role."""
    return {
        table: cluster.sql(TABLE_CHECKSUM.format(table), "shop")
        for table in ("customers", "orders", "big_spenders")
    } | {
        "owner": cluster.sql("SELECT tableowner FROM pg_tables WHERE tablename = 'orders'", "shop"),
        "role": cluster.sql(
            "SELECT rolname || ' ' || rolcanlogin FROM pg_roles WHERE rolname = 'shop_owner'"
        ),
        "sequence": cluster.sql("SELECT last_value FROM orders_id_seq", "shop"),
    }


def test_postgresql_cluster_dumped_restored_into_a_new_cluster_and_equal(
    host_config: LocalHost, start_postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    source = start_postgres()
    for statement in SHOP_SETUP:
        source.sql(statement)
    source.sql(SHOP_DATA, "shop")
    expected = shop_fingerprint(source)
    assert expected["customers"].startswith("20000 ") and expected["orders"].startswith("60000 ")

    install_snapshotter(host_config, "postgresql")
    use_cache_dir(host_config, tmp_path / "cache")
    for name, value in source.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PG_RUN_AS", "")  # TCP with trust: no need to switch users
    monkeypatch.setenv("PG_RESTRICT_KEY_FILE", str(tmp_path / "restrict-key"))
    first = archive(host_config, tmp_path / "first.json")
    assert first["snapshots"] == 1 and first["snapshot_bytes"] > 1_000_000

    listed = cli(host_config.config_dir, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (snapshot,) = json.loads(listed.stdout)[-1]["snapshots"]
    assert snapshot["error"] is None and snapshot["size"] == first["snapshot_bytes"]
    assert "template1 postgres shop" in snapshot["description"]
    assert (
        snapshot["restore_through"].startswith("psql ") and "ON_ERROR_STOP=1" in snapshot["restore_through"]
    )

    again = archive(host_config, tmp_path / "again.json")  # nothing changed: the same bytes, nothing sent
    assert again["bytes_uploaded"] == 0, again

    target = start_postgres()
    monkeypatch.setenv("PGPORT", str(target.port))
    restored = restore_snapshot(host_config, "postgresql")
    assert restored.returncode == 0, restored.stderr
    assert "restoring snapshot 'postgresql' through: psql" in restored.stderr
    assert shop_fingerprint(target) == expected

    # Restoring over what is now there stops at the first error (ON_ERROR_STOP) and says so.
    twice = restore_snapshot(host_config, "postgresql")
    assert twice.returncode == 1 and "(exited with status 3)" in twice.stderr
    assert 'role "shop_owner" already exists' in twice.stderr


# -- MariaDB / MySQL --------------------------------------------------------------------------------


@dataclass
class MariadbServer:
    top: Path
    port: int
    process: subprocess.Popen

    @property
    def defaults_file(self) -> Path:
        """The client options (root over TCP, no password) for mysql, mysqldump and the snapshotter."""
        return self.top / "client.cnf"

    def sql(self, statement: str, database: str = "") -> str:
        done = subprocess.run(
            ["mysql", f"--defaults-extra-file={self.defaults_file}", "--batch", "--skip-column-names",
             *([database] if database else []), "-e", statement],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mariadbd exited: {(self.top / 'error.log').read_text()[-2000:]}")
            ping = subprocess.run(
                ["mysql", f"--defaults-extra-file={self.defaults_file}", "-e", "SELECT 1"],
                capture_output=True,
            )
            if ping.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("mariadbd did not accept connections in time")


@pytest.fixture
def start_mariadb() -> Iterator[Callable[[], MariadbServer]]:
    server_bin, install_db = (
        shutil.which("mariadbd", path="/usr/sbin:/usr/bin"),
        shutil.which("mariadb-install-db"),
    )
    if server_bin is None or install_db is None or shutil.which("mysqldump") is None:
        pytest.skip("MariaDB is not installed (apt-get install mariadb-server; .ci/run does it)")
    run_as = ["runuser", "-u", "mysql", "--"] if os.geteuid() == 0 else []
    started: list[MariadbServer] = []

    def start() -> MariadbServer:
        top = Path(tempfile.mkdtemp(prefix="s3sb-mariadb-", dir="/var/tmp"))
        if run_as:
            shutil.chown(top, "mysql")
        subprocess.run(
            [*run_as, install_db, "--no-defaults", f"--datadir={top / 'data'}",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        port = free_port()
        process = subprocess.Popen(
            [*run_as, server_bin, "--no-defaults", f"--datadir={top / 'data'}", f"--port={port}",
             "--bind-address=127.0.0.1", f"--socket={top / 'mysqld.sock'}",
             f"--pid-file={top / 'mysqld.pid'}", "--skip-name-resolve", f"--log-error={top / 'error.log'}",
             "--innodb-flush-log-at-trx-commit=0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        server = MariadbServer(top, port, process)
        started.append(server)
        server.defaults_file.write_text(f"[client]\nhost=127.0.0.1\nport={port}\nuser=root\nprotocol=tcp\n")
        server.wait_ready()
        return server

    yield start
    for server in started:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()
        shutil.rmtree(server.top, ignore_errors=True)


STORE_SETUP = """
CREATE DATABASE store;
USE store;
CREATE TABLE products (id INT PRIMARY KEY, name VARCHAR(200) NOT NULL, price DECIMAL(10, 2), photo BLOB)
    ENGINE = InnoDB;
INSERT INTO products SELECT seq, CONCAT('product ', seq, ' it''s \ttabbed'), seq * 1.25, UNHEX(MD5(seq))
    FROM seq_1_to_30000;
CREATE TABLE stock (product_id INT PRIMARY KEY REFERENCES products (id), amount INT) ENGINE = InnoDB;
INSERT INTO stock SELECT seq, seq % 97 FROM seq_1_to_30000;
CREATE PROCEDURE restock(IN amount INT) UPDATE stock SET stock.amount = stock.amount + amount;
CREATE USER 'shopkeeper'@'%' IDENTIFIED BY 'not-a-secret';
GRANT SELECT, UPDATE ON store.* TO 'shopkeeper'@'%';
"""


# GROUP_CONCAT would be cut at group_concat_max_len: sum and xor of per-row CRCs instead.
ROWS_CHECKSUM = (
    "SELECT COUNT(*), SUM(CRC32(CONCAT_WS('|', {0}))), BIT_XOR(CRC32(CONCAT_WS('|', {0}))) FROM {1}"
)


def store_fingerprint(server: MariadbServer) -> dict[str, str]:
    """Row counts and order-independent checksums of every row, the procedure and the account's grants."""
    return {
        "products": server.sql(ROWS_CHECKSUM.format("id, name, price, HEX(photo)", "products"), "store"),
        "stock": server.sql(ROWS_CHECKSUM.format("product_id, amount", "stock"), "store"),
        "procedure": server.sql(
            "SELECT COUNT(*) FROM information_schema.routines WHERE routine_name = 'restock'"
        ),
        "grants": server.sql("SHOW GRANTS FOR 'shopkeeper'@'%'"),
    }


def test_mariadb_dumped_and_restored_into_a_new_server_and_equal(
    host_config: LocalHost, start_mariadb, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    source = start_mariadb()
    source.sql(STORE_SETUP)
    expected = store_fingerprint(source)
    assert expected["stock"].startswith("30000")

    install_snapshotter(host_config, "mysql")
    use_cache_dir(host_config, tmp_path / "cache")
    monkeypatch.setenv("MYSQL_DEFAULTS_FILE", str(source.defaults_file))
    first = archive(host_config, tmp_path / "first.json")
    assert first["snapshots"] == 1 and first["snapshot_bytes"] > 1_000_000
    again = archive(host_config, tmp_path / "again.json")
    assert again["bytes_uploaded"] == 0, again  # --skip-dump-date: an unchanged server dumps identically

    target = start_mariadb()
    # The restore-through line names the source's option file; point that file at the new server.
    source.defaults_file.write_text(target.defaults_file.read_text())
    restored = restore_snapshot(host_config, "mysql")
    assert restored.returncode == 0, restored.stderr
    assert "restoring snapshot 'mysql' through: mysql --defaults-extra-file=" in restored.stderr
    assert store_fingerprint(target) == expected


# -- SQLite ---------------------------------------------------------------------------------------


def build_sqlite_database(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            PRAGMA journal_mode = WAL;
            PRAGMA user_version = 42;
            CREATE TABLE notes (id INTEGER PRIMARY KEY, title TEXT NOT NULL, body BLOB, score REAL);
            CREATE INDEX notes_by_title ON notes (title);
            """
        )
        db.executemany(
            "INSERT INTO notes VALUES (?, ?, ?, ?)",
            ((i, f"note {i} 'quoted'", os.urandom(i % 300), i / 7) for i in range(1, 30_001)),
        )
    db.close()


def sqlite_fingerprint(path: Path) -> tuple:
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT id, title, body, score FROM notes ORDER BY id").fetchall()
        (check,) = db.execute("PRAGMA integrity_check").fetchone()
        (version,) = db.execute("PRAGMA user_version").fetchone()
        index = db.execute("SELECT sql FROM sqlite_master WHERE name = 'notes_by_title'").fetchone()
    finally:
        db.close()
    return len(rows), hash(tuple(rows)), check, version, index


@pytest.mark.parametrize("sqlite_format", ["backup", "dump"])
def test_sqlite_database_dumped_online_and_restored_through_its_command(
    host_config: LocalHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sqlite_format: str
):
    if shutil.which("sqlite3") is None:
        pytest.skip("the sqlite3 command is not installed (apt-get install sqlite3)")
    database = tmp_path / "app" / "app.db"
    database.parent.mkdir()
    build_sqlite_database(database)
    expected = sqlite_fingerprint(database)

    install_snapshotter(host_config, "sqlite", name="sqlite-app")
    use_cache_dir(host_config, tmp_path / "cache")
    monkeypatch.setenv("SQLITE_DATABASE", str(database))
    monkeypatch.setenv("SQLITE_FORMAT", sqlite_format)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    holder = sqlite3.connect(database)  # the application keeps the database open meanwhile
    try:
        holder.execute("SELECT count(*) FROM notes").fetchone()
        stats = archive(host_config, tmp_path / "stats.json")
    finally:
        holder.close()
    assert stats["snapshots"] == 1
    assert not list(tmp_path.glob("s3sb-sqlite.*"))  # the snapshotter's temporary copy is gone

    # The application breaks its data after the backup; the restore puts the backed-up data back.
    with sqlite3.connect(database) as db:
        db.execute("DELETE FROM notes WHERE id % 3 = 0")
        db.execute("UPDATE notes SET title = 'overwritten'")
    db.close()
    assert sqlite_fingerprint(database) != expected
    restored = restore_snapshot(host_config, "sqlite-app")
    assert restored.returncode == 0, restored.stderr
    got = sqlite_fingerprint(database)
    if sqlite_format == "dump":  # .dump keeps tables, rows and indexes, not the header's user_version
        assert got[:3] + got[4:] == expected[:3] + expected[4:] and got[3] == 0
    else:
        assert got == expected

    # From nothing: the database file is gone altogether.
    for leftover in database.parent.iterdir():
        leftover.unlink()
    restored = restore_snapshot(host_config, "sqlite-app")
    assert restored.returncode == 0, restored.stderr
    assert sqlite_fingerprint(database)[:3] == expected[:3]
    assert [p.name for p in database.parent.iterdir() if p.name.startswith(".s3sb-restore")] == []

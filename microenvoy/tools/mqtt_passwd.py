"""Manage MQTT password files (``docs/mqtt-auth.md``), like mosquitto_passwd.

    python -m microenvoy.tools.mqtt_passwd FILE USER             # password prompted twice (or one stdin line)
    python -m microenvoy.tools.mqtt_passwd -b FILE USER PASSWORD # batch mode, for scripts and tests
    python -m microenvoy.tools.mqtt_passwd -c FILE USER          # create (or overwrite) FILE
    python -m microenvoy.tools.mqtt_passwd -D FILE USER          # delete USER

``--scheme scrypt`` (default; ``--scrypt-n``, ``--scrypt-r``, ``--scrypt-p``) or ``--scheme pbkdf2-sha256``
(``--iterations``). Other lines of the file (users, comments) are kept as they are; the file is replaced
atomically and keeps its mode (a new file gets 0600). Exit status 0 on success, 1 on a usage or file error.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile
from collections.abc import Sequence

from microenvoy.mqtt.auth import (
    DEFAULT_PBKDF2_ITERATIONS,
    DEFAULT_SCHEME,
    DEFAULT_SCRYPT_N,
    DEFAULT_SCRYPT_P,
    DEFAULT_SCRYPT_R,
    SCHEMES,
    hash_password,
)

__all__ = ["main", "update_lines"]


class _Failure(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m microenvoy.tools.mqtt_passwd",
        description="Add, update or delete a user in an MQTT password file.",
    )
    p.add_argument("-b", "--batch", action="store_true", help="take the password from the command line")
    p.add_argument("-c", "--create", action="store_true", help="create the file (overwrites an existing one)")
    p.add_argument("-D", "--delete", action="store_true", help="delete the user")
    p.add_argument("--scheme", choices=SCHEMES, default=DEFAULT_SCHEME)
    p.add_argument(
        "--iterations", type=int, default=DEFAULT_PBKDF2_ITERATIONS, help="pbkdf2-sha256 iterations"
    )
    p.add_argument("--scrypt-n", type=int, default=DEFAULT_SCRYPT_N)
    p.add_argument("--scrypt-r", type=int, default=DEFAULT_SCRYPT_R)
    p.add_argument("--scrypt-p", type=int, default=DEFAULT_SCRYPT_P)
    p.add_argument("file")
    p.add_argument("user")
    p.add_argument("password", nargs="?", help="with -b only")
    return p


def update_lines(lines: Sequence[str], user: str, entry: str | None) -> tuple[list[str], bool]:
    """``lines`` with ``user``'s line replaced by ``entry`` (``user:hash``), appended if absent, or removed
    when ``entry`` is None. Returns the new lines and whether the user was present."""
    out: list[str] = []
    found = False
    for line in lines:
        name, sep, _ = line.strip().partition(":")
        if sep and name == user and not line.lstrip().startswith("#"):
            if not found and entry is not None:
                out.append(entry)
            found = True
            continue
        out.append(line)
    if not found and entry is not None:
        out.append(entry)
    return out, found


def _password(args: argparse.Namespace) -> str:
    if args.batch:
        if args.password is None:
            raise _Failure("-b needs the password as the third argument")
        return str(args.password)
    if args.password is not None:
        raise _Failure("a password argument needs -b (batch mode)")
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    first = getpass.getpass("Password: ")
    if getpass.getpass("Reenter password: ") != first:
        raise _Failure("passwords do not match")
    return first


def _write(path: str, lines: list[str], mode: int) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".mqtt_passwd.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _run(args: argparse.Namespace) -> None:
    user: str = args.user
    if not user or ":" in user or any(c in user for c in "\r\n\0") or user != user.strip() or user[0] == "#":
        raise _Failure(
            f"invalid username {user!r} (no ':', line breaks, NUL, surrounding spaces or leading '#')"
        )
    if args.delete and (args.create or args.batch):
        raise _Failure("-D cannot be combined with -c or -b")
    lines: list[str] = []
    mode = 0o600
    if not args.create:
        try:
            with open(args.file, encoding="utf-8") as f:
                lines = f.read().splitlines()
            mode = os.stat(args.file).st_mode & 0o777
        except FileNotFoundError:
            raise _Failure(f"{args.file}: no such file (use -c to create it)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise _Failure(f"{args.file}: {exc}") from None
    if args.delete:
        lines, found = update_lines(lines, user, None)
        if not found:
            raise _Failure(f"{args.file}: no user {user!r}")
    else:
        password = _password(args)
        if not password:
            raise _Failure("empty password")
        try:
            encoded = hash_password(
                password,
                scheme=args.scheme,
                iterations=args.iterations,
                n=args.scrypt_n,
                r=args.scrypt_r,
                p=args.scrypt_p,
            )
        except ValueError as exc:
            raise _Failure(str(exc)) from None
        lines, _ = update_lines(lines, user, f"{user}:{encoded}")
    try:
        _write(args.file, lines, mode)
    except OSError as exc:
        raise _Failure(f"{args.file}: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except _Failure as exc:
        print(f"mqtt_passwd: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Dropping root (--user, --group): the master binds as root, then becomes the user for good,
before it forks a single worker.

After the drop the master keeps only what it already holds: its listening sockets (and the stats
endpoint's), the pidfile it wrote, and the descriptors of its workers and calls. That is all a
reload (HUP: fork new workers) and an upgrade (USR2: re-exec the master, descriptors inherited,
nothing re-bound) need, so neither ever needs root again; the re-executed image finds itself
already the user and has nothing to drop.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd

log = logging.getLogger("esl_gateway.master")


class PrivilegeError(Exception):
    """The user or group cannot be switched to; the master must not start half-privileged."""


def _user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(f"no such user: {name!r}") from None


def _group_id(name: str) -> int:
    try:
        return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise PrivilegeError(f"no such group: {name!r}") from None


def drop(user: str | None, group: str | None, owned: list[str]) -> None:
    """Become ``user`` (and ``group``, default the user's own), with the user's supplementary
    groups and no others. ``owned``: files written as root that the user must be able to
    replace or remove later (the pidfile), handed to it first. A no-op when already the user
    (an upgraded master); an error when that would take root we do not have."""
    if user is None:
        if group is not None:
            raise PrivilegeError("--group needs --user")
        return
    entry = _user(user)
    gid = entry.pw_gid if group is None else _group_id(group)
    if (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) == (entry.pw_uid,) * 2 + (gid,) * 2:
        return
    if os.geteuid() != 0:
        raise PrivilegeError(f"switching to user {entry.pw_name} needs root; running as uid "
                             f"{os.geteuid()}")
    for path in owned:
        os.chown(path, entry.pw_uid, gid)
    os.initgroups(entry.pw_name, gid)   # the user's supplementary groups, root's dropped
    os.setgid(gid)                      # before setuid: afterwards we no longer may
    os.setuid(entry.pw_uid)             # real, effective and saved: no way back
    try:
        os.setuid(0)
    except PermissionError:
        pass   # as it must be
    else:
        raise PrivilegeError("root could be regained after dropping privileges")
    log.info("dropped privileges: now user %s (uid %d), group %d", entry.pw_name, entry.pw_uid,
             gid)

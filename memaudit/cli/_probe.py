"""``memaudit probe`` commands."""

from __future__ import annotations

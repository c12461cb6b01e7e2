"""The chat messages of a prompt: an optional system message, then the user's turn."""

from __future__ import annotations

from typing import Dict, List, Optional


def user_turn(content: str, system_prompt: Optional[str] = None) -> List[Dict[str, str]]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": "user", "content": content}]

"""The prompt formats a question is trained, evaluated, served and exported with: one definition.

`plain` is the original COCONUT's (`question + "\n"`, here after the media lines); `internvl2_5` is
InternVL's own chat template of that name, system turn included (InternVL's conversation template
`internvl2_5`: system template `<|im_start|>system\n{system_message}`, roles `<|im_start|>user\n` /
`<|im_start|>assistant\n`, separator `<|im_end|>\n`).
"""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"
INTERNVL_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
PROMPT_TEMPLATES = {
    "plain": "{media}{question}\n",
    "internvl2_5": (
        f"<|im_start|>system\n{INTERNVL_SYSTEM_MESSAGE}<|im_end|>\n"
        "<|im_start|>user\n{media}{question}<|im_end|>\n<|im_start|>assistant\n"
    ),
}

#!/usr/bin/env python3
"""Chat templates rendered by transformers, for tests/tokenizer.rs to match byte for byte.

    python3 -m venv /tmp/gg && /tmp/gg/bin/pip install transformers jinja2 gguf   # torch not needed
    /tmp/gg/bin/python scripts/make_chat_fixtures.py    # writes tests/fixtures/chat/templates.json

Templates: SmolLM2-135M-Instruct's own (read from the GGUF file that scripts/fetch-assets.sh
fetches), a Gemma-style one and a Llama-3-style one written for this test (whitespace control,
`namespace`, loop controls, `.strip()`, `| trim`, `tojson`, `raise_exception`, slicing). Each
is rendered by transformers' own `render_jinja_template` (the environment `apply_chat_template`
uses) for every conversation below, with and without the generation prompt, and with the
special tokens transformers passes. A conversation the template refuses records the error.
"""
import json
import pathlib

from transformers.utils.chat_template_utils import render_jinja_template

ROOT = pathlib.Path(__file__).resolve().parent.parent
ASSETS = pathlib.Path.home() / ".cache" / "tinytune"

GEMMA_STYLE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {{- message['content'] | trim }}\n"
    "    {{- '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{ '<start_of_turn>model\\n' }}\n"
    "{%- endif -%}\n"
)

LLAMA3_STYLE = """{{ bos_token }}
{% set ns = namespace(system='', turns=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% set ns.system = message['content'].strip() %}
        {% continue %}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
    {% if loop.first or (loop.index0 == 1 and messages[0]['role'] == 'system') %}
<|start_header_id|>system<|end_header_id|>

{{ ns.system if ns.system else 'Cutting Knowledge Date: December 2023' }}<|eot_id|>
    {% endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{{ message['content'] | trim }}<|eot_id|>
{% endfor %}
{% if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}
{# turns: {{ ns.turns }} #}
{{- '' if ns.turns else raise_exception('no turns') -}}
<!-- {{ messages | map(attribute='role') | list | tojson }} {{ {'n': ns.turns, 'last': messages[-1]['content'][:5]} | tojson }} -->
"""

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hi there!"}],
    "system_user": [{"role": "system", "content": "  You are terse.  "}, {"role": "user", "content": "What is 2+2?"}],
    "multi_turn": [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": " Blue. "},
        {"role": "user", "content": "Another, in \"quotes\" & <tags>, café ✓"},
    ],
    "assistant_last": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes.\n"}],
    "two_users": [{"role": "user", "content": "One"}, {"role": "user", "content": "Two"}],
}


def smollm2_template():
    import gguf

    r = gguf.GGUFReader(ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf")
    f = r.fields["tokenizer.chat_template"]
    return bytes(f.parts[f.data[0]]).decode()


def main():
    templates = [
        ("smollm2", smollm2_template(), {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>"}),
        ("gemma_style", GEMMA_STYLE, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}),
        ("llama3_style", LLAMA3_STYLE, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    ]
    out = []
    for name, template, special in templates:
        cases = []
        for conv_name, conv in CONVERSATIONS.items():
            for gen in (False, True):
                try:
                    (text,), _ = render_jinja_template(conversations=[conv], chat_template=template, add_generation_prompt=gen, **special)
                    cases.append({"conversation": conv_name, "add_generation_prompt": gen, "text": text})
                except Exception as e:  # the template refused the conversation
                    cases.append({"conversation": conv_name, "add_generation_prompt": gen, "error": str(e)})
        out.append({"name": name, "template": template, "special": special, "cases": cases})
    path = ROOT / "tests" / "fixtures" / "chat" / "templates.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"conversations": CONVERSATIONS, "templates": out}, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""模型家族：共享的解码栈（decoder）与每个家族一个模块，都建在共享的 ``functional_lm.layers`` 之上。

    decoder     所有家族共用：init_params、check_params、forward、forward_hidden、KV 缓存路径（cfg.family 选家族）
    family      一个家族对解码栈的描述（Family：参数形状、注意力与前馈混合器、RoPE 表）
    qwen2       Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen：GQA + 稠密 SwiGLU
    qwen3       Qwen3 稠密：Qwen2 + 每头 QK-norm，无偏置，头维度可 ≠ d/h
    cache       各家族共用的 KV 缓存：KVCache、init_cache，以及一次写入的簿记（plan_write、layer_slot、advance）
"""

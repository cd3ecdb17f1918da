"""模型家族：共享的解码栈（decoder）与每个家族一个模块，都建在共享的 ``functional_lm.layers`` 之上。

    decoder     所有家族共用：init_params、check_params、forward、forward_hidden、KV 缓存路径（cfg.family 选家族）
    family      一个家族对解码栈的描述（Family：参数形状、注意力与前馈混合器、RoPE 表）
    qwen2       Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen：GQA + 稠密 SwiGLU
    qwen3       Qwen3 稠密：Qwen2 + 每头 QK-norm，无偏置，头维度可 ≠ d/h
    qwen3_moe   Qwen3-MoE：Qwen3 的注意力 + softmax 路由的稀疏专家（mlp_only_layers / decoder_sparse_step 选层）
    deepseek_v3 DeepSeek-V3 / R1：MLA（多头潜变量注意力）+ YaRN + DeepSeekMoE（分组限制的 sigmoid 路由、共享专家）
    routing     router_logits：每个 MoE 层的路由 logits，供 layers.moe.load_balancing_loss 使用（MoE 学生）
    cache       各家族共用的 KV 缓存：KVCache、init_cache、cache_widths / cache_bytes_per_token（MLA 只存潜变量与
                RoPE 键），以及一次写入的簿记（plan_write、layer_slot、advance）
"""

"""模型家族：每个家族一个模块，都建在共享的 ``functional_lm.layers`` 之上。

    qwen2   Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen：init_params、forward、forward_hidden、KV 缓存路径
    cache   各家族共用的 KV 缓存：KVCache、init_cache，以及一次写入的簿记（plan_write、layer_slot、advance）
"""

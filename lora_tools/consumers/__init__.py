"""What the programs that load adapters (PEFT, diffusers, ComfyUI, vLLM, SGLang, TGI, llama.cpp)
do with a file, each modelled on its own loading code: :mod:`lora_tools.consumers.scales`, the
scale each one applies to each module.
"""

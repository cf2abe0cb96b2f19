"""`python -m jdlora_ops` prints how the native extension was built."""

import torch

import jdlora_ops


def main() -> None:
    info = jdlora_ops.build_info()
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v if v != '' else '-'}")
    print(f"{'torch_running':<{width}}  {torch.__version__}")
    print(f"{'cuda_available':<{width}}  {torch.cuda.is_available()}")


if __name__ == "__main__":
    main()

# What the GPU machine offers for MPS (run there by hand): the control program, the default pipe
# directory, get_server_list without and with a private daemon, a CUDA client under it, quit.
# What it showed (H200, December 2026) is summarised in asap/mps.py's probe and tests/gpu/test_mps.py.
echo "== mps probe"; which nvidia-cuda-mps-control nvidia-smi; env | grep -i mps; ls -la /tmp/nvidia-mps /var/log/nvidia-mps 2>&1 | head; nvidia-smi --query-gpu=name,compute_mode --format=csv
timeout 5 bash -c 'echo get_server_list | nvidia-cuda-mps-control'; echo "rc=$?"
d=$(mktemp -d); export CUDA_MPS_PIPE_DIRECTORY=$d/pipe CUDA_MPS_LOG_DIRECTORY=$d/log; mkdir -p $d/pipe $d/log
nvidia-cuda-mps-control -d; echo "start rc=$?"; ls $d/pipe
timeout 5 bash -c 'echo get_server_list | nvidia-cuda-mps-control'; echo "list rc=$?"
python3 -c "import torch; torch.zeros(1,device='cuda'); print('cuda under mps ok')"
timeout 5 bash -c 'echo get_server_list | nvidia-cuda-mps-control'; echo "list2 rc=$?"
echo quit | nvidia-cuda-mps-control; echo "quit rc=$?"; sleep 1; ls $d/pipe; cat $d/log/control.log | tail -5

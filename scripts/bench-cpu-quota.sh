#!/usr/bin/env bash
# heron serve inside a cgroup (v1) with a quota of one CPU, then `heron bench serve` from
# outside at c=1 and c=16 (128 in / 64 out): what a container's --cpus=1 gives. As root.
# usage: scripts/bench-cpu-quota.sh CHECKOUT PORT   (README: "Threads and memory in a container")
set -u
g=/sys/fs/cgroup/cpu/heron-quota
mkdir -p $g && echo 100000 > $g/cpu.cfs_period_us && echo 100000 > $g/cpu.cfs_quota_us
PY=${PY:-$1/.venv/bin/python}
cd /tmp  # python -m from inside a checkout would import that checkout
PYTHONPATH=$1 sh -c "echo \$\$ > $g/cgroup.procs; exec $PY -m heron serve --port $2" > /tmp/quota_serve_$2.log 2>&1 &
for _ in $(seq 120); do curl -s "localhost:$2/health" | grep -q ok && break; sleep 1; done
for c in 1 16; do
  PYTHONPATH=$1 $PY -m heron bench serve --base-url "http://127.0.0.1:$2" --input-len 128 \
    --output-len 64 --num-prompts $((c == 1 ? 8 : 32)) --max-concurrency $c --ignore-eos \
    --num-warmups 1 --disable-tqdm 2>&1 | grep -E "Output token throughput|Median TPOT|Failed"
done
grep -E "threads" /tmp/quota_serve_$2.log | head -2
kill "$(lsof -t -i ":$2" -sTCP:LISTEN)" 2>/dev/null; sleep 3; rmdir $g 2>/dev/null || true

#!/bin/sh
# On the GPU bench machine, after `. bench/device_setup.sh`: the temporal pair
# (bench/temporal_pair.py, its arguments passed on) with the code in _old/ and with the
# working tree's, in turn, ROUNDS times (default 2): one JSON line each, with the GPU time
# of each kernel named in KERNELS (key message, delta message). The bench machine has no
# git: make _old/ before the run, where git is, and delete it before committing:
#     rm -rf _old && mkdir _old && git archive HEAD | tar -x -C _old
ROUNDS=${ROUNDS:-2}
KERNELS=${KERNELS:-"_quantise_kernel _encode_kernel _decode_kernel _inverse_kernel"}
[ -d _old/codec ] || { echo "no _old/ here: see the comment at the top of $0" >&2; exit 2; }
mkdir -p /tmp/pkg_old && ln -sfn "$PWD/_old" /tmp/pkg_old/comfy_mesh
for round in $(seq "$ROUNDS"); do
    for tree in old new; do
        if [ "$tree" = old ]; then pkg=/tmp/pkg_old; else pkg=/tmp/pkg; fi
        PYTHONPATH=$pkg:/tmp/site python3 bench/temporal_pair.py "$@" 2>/dev/null | TREE=$tree KERNELS=$KERNELS python3 -c "
import json, os, sys
d = json.load(sys.stdin)
sides = ('key_encode', 'key_decode', 'delta_encode', 'delta_decode')
def kern(kind, name):  # a kernel's time in the encode or decode of one kind of message
    return (d[kind + '_encode']['top'].get(name) or d[kind + '_decode']['top'].get(name) or [0, None])[1]
print(json.dumps({'tree': os.environ['TREE'], 'ratio': [d['ratio_key'], d['ratio_delta']],
                  'pair': [d['pair_key_ms'], d['pair_delta_ms']], 'gpu_ms': [d[s]['gpu_ms'] for s in sides],
                  'span_ms': [d[s].get('span_ms') for s in sides], 'launches': [d[s]['launches'] for s in sides],
                  **{k: [kern('key', k), kern('delta', k)] for k in os.environ['KERNELS'].split()}}))"
    done
done

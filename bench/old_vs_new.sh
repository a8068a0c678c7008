#!/bin/sh
# On the GPU bench machine, after `. bench/device_setup.sh`: the temporal pair
# (bench/temporal_pair.py, its arguments passed on) with the code in _old/ and with the
# working tree's, in turn, ROUNDS times (default 2): one JSON line each. The bench machine
# has no git: make _old/ before the run, where git is, and delete it before committing:
#     rm -rf _old && mkdir _old && git archive HEAD | tar -x -C _old
ROUNDS=${ROUNDS:-2}
[ -d _old/codec ] || { echo "no _old/ here: see the comment at the top of $0" >&2; exit 2; }
mkdir -p /tmp/pkg_old && ln -sfn "$PWD/_old" /tmp/pkg_old/comfy_mesh
for round in $(seq "$ROUNDS"); do
    for tree in old new; do
        if [ "$tree" = old ]; then pkg=/tmp/pkg_old; else pkg=/tmp/pkg; fi
        PYTHONPATH=$pkg:/tmp/site python3 bench/temporal_pair.py "$@" 2>/dev/null | TREE=$tree python3 -c "
import json, os, sys
d = json.load(sys.stdin)
kern = lambda side, name: d[side]['top'].get(name, [0, None])[1]
sides = ('key_encode', 'key_decode', 'delta_encode', 'delta_decode')
print(json.dumps({'tree': os.environ['TREE'], 'ratio': [d['ratio_key'], d['ratio_delta']],
                  'pair': [d['pair_key_ms'], d['pair_delta_ms']], 'gpu_ms': [d[s]['gpu_ms'] for s in sides],
                  'decode_kernel': [kern('key_decode', '_decode_kernel'), kern('delta_decode', '_decode_kernel')],
                  'encode_kernel': [kern('key_encode', '_encode_kernel'), kern('delta_encode', '_encode_kernel')]}))"
    done
done

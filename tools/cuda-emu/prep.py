# Turns a .cu kernel file into C++ for the emulator: common.cuh prepended (as src/cuda/sources.rs
# does), its PTX primitives replaced by prims.h, CUDA keywords mapped.
import os, re, sys
src, prims, out = sys.argv[1:4]
common = os.path.join(os.path.dirname(os.path.abspath(src)), 'common.cuh')
s = open(common).read() + open(src).read()
a = s.index('// <ptx-primitives>'); b = s.index('// </ptx-primitives>')
s = s[:a] + '#include "' + prims + '"\n' + s[b:]
# the Hopper file's warpgroup-MMA section (prims_wgmma.h)
if '// <wgmma-primitives>' in s:
    a = s.index('// <wgmma-primitives>'); b = s.index('// </wgmma-primitives>')
    s = s[:a] + '#include "prims_wgmma.h"\n' + s[b:]
# ... and its tensor-map copies and mbarriers (prims_tma.h)
if '// <tma-primitives>' in s:
    a = s.index('// <tma-primitives>'); b = s.index('// </tma-primitives>')
    s = s[:a] + '#include "prims_tma.h"\n' + s[b:]
s = s.replace('__grid_constant__', '')
s = s.replace('extern "C" __global__', '__global__')
s = s.replace('extern __shared__', 'extern')
s = re.sub(r'\b__shared__\b', 'static', s)
open(out, 'w').write(s)

# Turns a .cu kernel file into C++ for the emulator: PTX primitives replaced, CUDA keywords mapped.
import re, sys
src, prims, out = sys.argv[1:4]
s = open(src).read()
a = s.index('// <ptx-primitives>'); b = s.index('// </ptx-primitives>')
s = s[:a] + '#include "' + prims + '"\n' + s[b:]
s = s.replace('extern "C" __global__', '__global__')
s = s.replace('extern __shared__', 'extern')
s = re.sub(r'\b__shared__\b', 'static', s)
open(out, 'w').write(s)

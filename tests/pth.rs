//! The restricted `.pth` reader: small PyTorch-style zip checkpoints assembled here (the zip with
//! the `zip` crate, the pickle byte by byte, laid out as `torch.save(state_dict)` writes it with
//! protocol 2, and a protocol-4 variant), read back and checked; malicious or malformed files
//! must give clear errors.

use nabla::io::TensorFile;
use nabla::wan::pth::{PthFile, convert_to_safetensors};
use safetensors::Dtype;
use std::io::Write;
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pth_tests");
    std::fs::create_dir_all(&d).unwrap();
    d.join(format!("{}_{name}", std::process::id()))
}

// ----- a tiny pickle assembler --------------------------------------------------------------

const MARK: u8 = b'(';
const STOP: u8 = b'.';
const TUPLE: u8 = b't';
const EMPTY_TUPLE: u8 = b')';
const EMPTY_DICT: u8 = b'}';
const REDUCE: u8 = b'R';
const BUILD: u8 = b'b';
const SETITEM: u8 = b's';
const SETITEMS: u8 = b'u';
const BINPERSID: u8 = b'Q';
const NEWFALSE: u8 = 0x89;
const TUPLE1: u8 = 0x85;
const STACK_GLOBAL: u8 = 0x93;
const MEMOIZE: u8 = 0x94;

#[derive(Default)]
struct Pickle {
    b: Vec<u8>,
    memo: u32,
}

impl Pickle {
    fn new(proto: u8) -> Pickle {
        let mut p = Pickle::default();
        p.b.extend([0x80, proto]);
        p
    }
    fn op(&mut self, o: u8) -> &mut Self {
        self.b.push(o);
        self
    }
    /// BINPUT with the next memo index (what Python's pickler does after most objects).
    fn put(&mut self) -> u32 {
        let i = self.memo;
        self.memo += 1;
        self.b.extend([b'q', i as u8]);
        i
    }
    fn get(&mut self, i: u32) -> &mut Self {
        self.b.extend([b'h', i as u8]);
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.b.push(b'X');
        self.b.extend((s.len() as u32).to_le_bytes());
        self.b.extend(s.as_bytes());
        self
    }
    fn short_str(&mut self, s: &str) -> &mut Self {
        self.b.extend([0x8c, s.len() as u8]);
        self.b.extend(s.as_bytes());
        self
    }
    fn int(&mut self, v: i64) -> &mut Self {
        if (0..256).contains(&v) {
            self.b.extend([b'K', v as u8]);
        } else if (0..65536).contains(&v) {
            self.b.push(b'M');
            self.b.extend((v as u16).to_le_bytes());
        } else if i32::try_from(v).is_ok() {
            self.b.push(b'J');
            self.b.extend((v as i32).to_le_bytes());
        } else {
            self.b.extend([0x8a, 8]);
            self.b.extend(v.to_le_bytes());
        }
        self
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.b.push(b'c');
        self.b.extend(format!("{module}\n{name}\n").as_bytes());
        self
    }
    /// A tuple of ints as Python's pickler writes it (protocol 2): `EMPTY_TUPLE`, `TUPLE1..3`
    /// or `MARK … TUPLE`, memoized unless empty.
    fn ints(&mut self, v: &[i64]) -> &mut Self {
        if v.is_empty() {
            return self.op(EMPTY_TUPLE);
        }
        if v.len() > 3 {
            self.op(MARK);
        }
        for &x in v {
            self.int(x);
        }
        match v.len() {
            1..=3 => self.op(0x84 + v.len() as u8),
            _ => self.op(TUPLE),
        };
        self.put();
        self
    }
    fn bytes(&self) -> Vec<u8> {
        self.b.clone()
    }
}

/// One tensor of a test state dict.
struct T {
    name: &'static str,
    storage_type: &'static str,
    key: &'static str,
    storage_numel: i64,
    offset: i64,
    shape: Vec<i64>,
    stride: Vec<i64>,
}

/// The pickle `torch.save(state_dict)` writes (protocol 2), `_metadata` BUILD included. For the
/// two tensors of [`two_tensors`] the bytes equal those of Python's own pickler given the same
/// objects (checked while writing this test).
fn state_dict_pickle(tensors: &[T]) -> Vec<u8> {
    let mut p = Pickle::new(2);
    p.global("collections", "OrderedDict");
    let od = p.put();
    p.op(EMPTY_TUPLE).op(REDUCE);
    p.put();
    p.op(MARK);
    let mut rebuild = None;
    let mut storage_str = None;
    let mut cpu = None;
    for t in tensors {
        p.str(t.name);
        p.put();
        match rebuild {
            Some(i) => {
                p.get(i);
            }
            None => {
                p.global("torch._utils", "_rebuild_tensor_v2");
                rebuild = Some(p.put());
            }
        }
        p.op(MARK).op(MARK);
        match storage_str {
            Some(i) => {
                p.get(i);
            }
            None => {
                p.str("storage");
                storage_str = Some(p.put());
            }
        }
        p.global("torch", t.storage_type);
        p.put();
        p.str(t.key);
        p.put();
        match cpu {
            Some(i) => {
                p.get(i);
            }
            None => {
                p.str("cpu");
                cpu = Some(p.put());
            }
        }
        p.int(t.storage_numel);
        p.op(TUPLE);
        p.put();
        p.op(BINPERSID);
        p.int(t.offset);
        p.ints(&t.shape);
        p.ints(&t.stride);
        p.op(NEWFALSE);
        p.get(od).op(EMPTY_TUPLE).op(REDUCE);
        p.put();
        p.op(TUPLE);
        p.put();
        p.op(REDUCE);
        p.put();
    }
    p.op(SETITEMS);
    // state: {'_metadata': OrderedDict({'': {'version': 1}})}
    p.op(EMPTY_DICT);
    p.put();
    p.str("_metadata");
    p.put();
    p.get(od).op(EMPTY_TUPLE).op(REDUCE);
    p.put();
    p.str("");
    p.put();
    p.op(EMPTY_DICT);
    p.put();
    p.str("version");
    p.put();
    p.int(1);
    p.op(SETITEM).op(SETITEM).op(SETITEM).op(BUILD).op(STOP);
    p.bytes()
}

/// A zip laid out like torch.save's: `<top>/data.pkl`, `<top>/data/<key>`, `<top>/version`,
/// `<top>/byteorder`.
fn write_pth(path: &Path, top: &str, pickle: &[u8], storages: &[(&str, Vec<u8>)]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let o =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file(format!("{top}/data.pkl"), o).unwrap();
    z.write_all(pickle).unwrap();
    z.start_file(format!("{top}/byteorder"), o).unwrap();
    z.write_all(b"little").unwrap();
    for (key, bytes) in storages {
        z.start_file(format!("{top}/data/{key}"), o).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.start_file(format!("{top}/version"), o).unwrap();
    z.write_all(b"3\n").unwrap();
    z.finish().unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
        .collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect()
}

const W: [f32; 6] = [1.0, -2.5, 3.25, 0.0, 1e-3, -7.0];
const B_STORAGE: [f32; 5] = [9.0, 9.0, 0.5, -1.5, 2.0];

fn two_tensors() -> Vec<T> {
    vec![
        T {
            name: "blocks.0.attn.q.weight",
            storage_type: "FloatStorage",
            key: "0",
            storage_numel: 6,
            offset: 0,
            shape: vec![2, 3],
            stride: vec![3, 1],
        },
        // a bf16 view into the middle of its storage (storage offset 2)
        T {
            name: "norm.weight",
            storage_type: "BFloat16Storage",
            key: "1",
            storage_numel: 5,
            offset: 2,
            shape: vec![3],
            stride: vec![1],
        },
    ]
}

fn two_tensor_file(tag: &str) -> PathBuf {
    let path = tmp(&format!("{tag}.pth"));
    write_pth(
        &path,
        "models_t5_tiny",
        &state_dict_pickle(&two_tensors()),
        &[("0", f32_bytes(&W)), ("1", bf16_bytes(&B_STORAGE))],
    );
    path
}

fn open_err(path: &Path) -> String {
    match PthFile::open(path) {
        Ok(f) => panic!("{} opened although it is bad: {f:?}", path.display()),
        Err(e) => {
            eprintln!("{e}");
            e.to_string()
        }
    }
}

#[test]
fn reads_f32_and_bf16_with_storage_offset() {
    let path = two_tensor_file("two");
    let f = PthFile::open(&path).unwrap();
    assert_eq!(f.names(), vec!["blocks.0.attn.q.weight", "norm.weight"]);
    assert_eq!(f.len(), 2);
    assert!(f.contains("norm.weight") && !f.contains("missing"));

    let r = f.raw("blocks.0.attn.q.weight").unwrap();
    assert_eq!(r.dtype, Dtype::F32);
    assert_eq!(r.shape, vec![2, 3]);
    assert_eq!(r.data, &f32_bytes(&W)[..]);
    let (v, s) = f.f32("blocks.0.attn.q.weight").unwrap();
    assert_eq!(s, vec![2, 3]);
    assert_eq!(v, W.to_vec());

    let r = f.raw("norm.weight").unwrap();
    assert_eq!(r.dtype, Dtype::BF16);
    assert_eq!(r.shape, vec![3]);
    assert_eq!(r.data, &bf16_bytes(&B_STORAGE)[4..]);
    let (v, s) = f.f32("norm.weight").unwrap();
    assert_eq!(s, vec![3]);
    assert_eq!(v, vec![0.5, -1.5, 2.0]);

    let e = f.raw("missing").err().unwrap().to_string();
    assert!(
        e.contains("\"missing\"") && e.contains("norm.weight"),
        "{e}"
    );
}

#[test]
fn converts_to_safetensors() {
    let path = two_tensor_file("conv");
    let out = tmp("conv.safetensors");
    assert_eq!(convert_to_safetensors(&path, &out).unwrap(), 2);
    let st = TensorFile::open(&out).unwrap();
    let mut names = st.names().unwrap();
    names.sort();
    assert_eq!(names, vec!["blocks.0.attn.q.weight", "norm.weight"]);
    assert_eq!(st.f32("blocks.0.attn.q.weight").unwrap().0, W.to_vec());
    let r = st.raw("norm.weight").unwrap();
    assert_eq!(r.dtype, Dtype::BF16);
    assert_eq!(st.f32("norm.weight").unwrap().0, vec![0.5, -1.5, 2.0]);
    assert_eq!(st.metadata().unwrap()["format"], "pt");
    assert!(!tmp("conv.safetensors.partial").exists());
    // converting onto itself is refused (it would destroy the mapped input)
    let e = convert_to_safetensors(&path, &path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("another output path"), "{e}");
    assert!(PthFile::open(&path).is_ok());
}

#[test]
fn protocol_4_opcodes_shared_storage_and_f16() {
    // FRAME, SHORT_BINUNICODE, STACK_GLOBAL, MEMOIZE, _rebuild_parameter, an f16 tensor, two
    // tensors sharing one storage, a 4-d contiguous tensor with a size-1 dimension whose stride
    // is arbitrary (PyTorch ignores it too), and a scalar.
    let mut p = Pickle::new(4);
    p.b.push(0x95);
    p.b.extend(0u64.to_le_bytes());
    p.op(EMPTY_DICT).op(MEMOIZE).op(MARK);
    let tensor = |p: &mut Pickle, name: &str, offset: i64, shape: &[i64], stride: &[i64]| {
        p.short_str(name).op(MEMOIZE);
        p.short_str("torch._utils")
            .short_str("_rebuild_parameter")
            .op(STACK_GLOBAL);
        p.short_str("torch._utils")
            .short_str("_rebuild_tensor_v2")
            .op(STACK_GLOBAL)
            .op(MEMOIZE);
        p.op(MARK).op(MARK).short_str("storage");
        p.short_str("torch")
            .short_str("HalfStorage")
            .op(STACK_GLOBAL);
        p.short_str("7")
            .short_str("cuda:0")
            .int(8)
            .op(TUPLE)
            .op(BINPERSID);
        p.int(offset);
        p.op(MARK);
        for &d in shape {
            p.int(d);
        }
        p.op(TUPLE).op(MARK);
        for &d in stride {
            p.int(d);
        }
        p.op(TUPLE).op(NEWFALSE);
        p.global("collections", "OrderedDict")
            .op(EMPTY_TUPLE)
            .op(REDUCE);
        p.op(TUPLE).op(REDUCE);
        // _rebuild_parameter(tensor, requires_grad, hooks)
        p.op(0x88);
        p.global("collections", "OrderedDict")
            .op(EMPTY_TUPLE)
            .op(REDUCE);
        p.op(0x87).op(REDUCE).op(MEMOIZE);
    };
    tensor(&mut p, "conv.weight", 0, &[2, 1, 1, 3], &[3, 99, 3, 1]);
    tensor(&mut p, "scale", 7, &[], &[]);
    p.op(SETITEMS).op(STOP);
    let vals = [0.5f32, 1.0, -2.0, 4.0, 0.25, -0.125, 8.0, 3.0];
    let path = tmp("p4.pth");
    write_pth(&path, "archive", &p.bytes(), &[("7", f16_bytes(&vals))]);
    let f = PthFile::open(&path).unwrap();
    assert_eq!(f.names(), vec!["conv.weight", "scale"]);
    let (v, s) = f.f32("conv.weight").unwrap();
    assert_eq!(s, vec![2, 1, 1, 3]);
    assert_eq!(v, vals[..6].to_vec());
    assert_eq!(f.raw("conv.weight").unwrap().dtype, Dtype::F16);
    let (v, s) = f.f32("scale").unwrap();
    assert!(s.is_empty());
    assert_eq!(v, vec![3.0]);
}

#[test]
fn forbidden_globals_are_refused() {
    // the classic: os.system("…") through GLOBAL + REDUCE
    let mut p = Pickle::new(2);
    p.global("os", "system")
        .str("touch /tmp/pwned")
        .op(TUPLE1)
        .op(REDUCE);
    p.op(STOP);
    let path = tmp("os_system.pth");
    write_pth(&path, "archive", &p.bytes(), &[]);
    let e = open_err(&path);
    assert!(
        e.contains("`os.system`") && e.contains("not allowed"),
        "{e}"
    );
    assert!(e.contains("never runs"), "{e}");

    // builtins.eval through STACK_GLOBAL (protocol 4)
    let mut p = Pickle::new(4);
    p.short_str("builtins")
        .short_str("eval")
        .op(STACK_GLOBAL)
        .short_str("1+1")
        .op(TUPLE1)
        .op(REDUCE)
        .op(STOP);
    let path = tmp("eval.pth");
    write_pth(&path, "archive", &p.bytes(), &[]);
    let e = open_err(&path);
    assert!(
        e.contains("`builtins.eval`") && e.contains("not allowed"),
        "{e}"
    );

    // a torch global that is not a storage or a rebuild function
    let mut p = Pickle::new(2);
    p.global("torch", "load").op(STOP);
    let path = tmp("torch_load.pth");
    write_pth(&path, "archive", &p.bytes(), &[]);
    let e = open_err(&path);
    assert!(e.contains("`torch.load`"), "{e}");
}

#[test]
fn forbidden_opcodes_are_refused() {
    for (name, body) in [
        ("INST", b"i__main__\nEvil\n".to_vec()),
        ("OBJ", vec![MARK, b'o']),
        ("NEWOBJ", vec![0x81]),
        ("EXT1", vec![0x82, 1]),
        ("INT", b"I1\n".to_vec()),
        ("PERSID", b"P0\n".to_vec()),
    ] {
        let mut p = Pickle::new(2);
        p.op(EMPTY_TUPLE);
        p.b.extend(&body);
        p.op(STOP);
        let path = tmp(&format!("op_{name}.pth"));
        write_pth(&path, "archive", &p.bytes(), &[]);
        let e = open_err(&path);
        assert!(
            e.contains(&format!("opcode {name} (0x")) && e.contains("not allowed"),
            "{name}: {e}"
        );
        assert!(e.contains("data.pkl"), "{e}");
    }
    // an opcode byte pickle does not define
    let mut p = Pickle::new(2);
    p.op(0xff).op(STOP);
    let path = tmp("op_unknown.pth");
    write_pth(&path, "archive", &p.bytes(), &[]);
    let e = open_err(&path);
    assert!(e.contains("unknown opcode 0xff"), "{e}");
}

#[test]
fn truncated_files_are_refused() {
    let good = two_tensor_file("trunc_src");
    let bytes = std::fs::read(&good).unwrap();
    for cut in [bytes.len() / 2, bytes.len() - 10] {
        let path = tmp(&format!("trunc_{cut}.pth"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let e = open_err(&path);
        assert!(e.contains("truncated"), "{e}");
        assert!(e.contains(&path.display().to_string()), "{e}");
    }
    // a complete zip whose pickle stops early
    let pkl = state_dict_pickle(&two_tensors());
    let path = tmp("trunc_pkl.pth");
    write_pth(&path, "archive", &pkl[..pkl.len() / 2], &[]);
    let e = open_err(&path);
    assert!(e.contains("truncated"), "{e}");
    // a storage shorter than the pickle says
    let path = tmp("short_storage.pth");
    write_pth(
        &path,
        "archive",
        &pkl,
        &[("0", f32_bytes(&W[..4])), ("1", bf16_bytes(&B_STORAGE))],
    );
    let e = open_err(&path);
    assert!(
        e.contains("blocks.0.attn.q.weight") && e.contains("6 elements"),
        "{e}"
    );
    // a storage missing altogether
    let path = tmp("no_storage.pth");
    write_pth(&path, "archive", &pkl, &[("0", f32_bytes(&W))]);
    let e = open_err(&path);
    assert!(
        e.contains("\"archive/data/1\"") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn non_contiguous_tensors_are_refused() {
    let mut t = two_tensors();
    t[0].stride = vec![1, 2]; // a transposed view
    let path = tmp("noncontig.pth");
    write_pth(
        &path,
        "archive",
        &state_dict_pickle(&t),
        &[("0", f32_bytes(&W)), ("1", bf16_bytes(&B_STORAGE))],
    );
    let e = open_err(&path);
    assert!(
        e.contains("blocks.0.attn.q.weight") && e.contains("not contiguous"),
        "{e}"
    );
    assert!(e.contains("[3, 1]") && e.contains(".contiguous()"), "{e}");
    // a view running past its storage
    let mut t = two_tensors();
    t[1].offset = 3;
    let path = tmp("overrun.pth");
    write_pth(
        &path,
        "archive",
        &state_dict_pickle(&t),
        &[("0", f32_bytes(&W)), ("1", bf16_bytes(&B_STORAGE))],
    );
    let e = open_err(&path);
    assert!(e.contains("norm.weight") && e.contains("exceeds"), "{e}");
}

#[test]
fn other_malformed_inputs() {
    // not a zip at all
    let path = tmp("text.pth");
    std::fs::write(&path, "hello, not a checkpoint").unwrap();
    let e = open_err(&path);
    assert!(e.contains("not a PyTorch checkpoint"), "{e}");
    // the legacy (pre-1.6) format: a bare pickle stream
    let path = tmp("legacy.pth");
    std::fs::write(&path, [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc]).unwrap();
    let e = open_err(&path);
    assert!(e.contains("legacy"), "{e}");
    // an empty file
    let path = tmp("empty.pth");
    std::fs::write(&path, []).unwrap();
    assert!(open_err(&path).contains("empty"));
    // a zip without data.pkl
    let path = tmp("nopkl.pth");
    let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    z.start_file("readme.txt", zip::write::SimpleFileOptions::default())
        .unwrap();
    z.write_all(b"hi").unwrap();
    z.finish().unwrap();
    let e = open_err(&path);
    assert!(e.contains("data.pkl") && e.contains("readme.txt"), "{e}");
    // a pickle that is a list, not a dict
    let mut p = Pickle::new(2);
    p.op(b']').op(STOP);
    let path = tmp("list.pth");
    write_pth(&path, "archive", &p.bytes(), &[]);
    let e = open_err(&path);
    assert!(e.contains("a list, not a dict"), "{e}");
    // a wrapper dict {"state_dict": {...}}
    let mut p = Pickle::new(2);
    p.op(EMPTY_DICT)
        .str("state_dict")
        .op(EMPTY_DICT)
        .op(SETITEM)
        .op(STOP);
    let path = tmp("wrapped.pth");
    write_pth(&path, "archive", &p.bytes(), &[]);
    let e = open_err(&path);
    assert!(
        e.contains("\"state_dict\"") && e.contains("flat state dict"),
        "{e}"
    );
    // big-endian storages
    let path = tmp("bigendian.pth");
    let f = std::fs::File::create(&path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let o = zip::write::SimpleFileOptions::default();
    z.start_file("archive/data.pkl", o).unwrap();
    z.write_all(&state_dict_pickle(&[])).unwrap();
    z.start_file("archive/byteorder", o).unwrap();
    z.write_all(b"big").unwrap();
    z.finish().unwrap();
    let e = open_err(&path);
    assert!(e.contains("\"big\"") && e.contains("little-endian"), "{e}");
    // an empty state dict is fine
    let path = tmp("empty_sd.pth");
    write_pth(&path, "archive", &state_dict_pickle(&[]), &[]);
    assert!(PthFile::open(&path).unwrap().is_empty());
}

#[test]
fn deeply_nested_pickles_do_not_crash() {
    // a million nested tuples (TUPLE1 applied over and over) and lists (EMPTY_LIST × n, then
    // APPEND × n−1): refused as "not a dict", without overflowing the stack while dropping them
    let n = 1_000_000;
    let mut p = Pickle::new(2);
    p.op(EMPTY_TUPLE);
    p.b.extend(std::iter::repeat_n(TUPLE1, n));
    p.op(STOP);
    let path = tmp("deep_tuple.pth");
    write_pth(&path, "archive", &p.bytes(), &[]);
    assert!(open_err(&path).contains("a tuple, not a dict"));

    let mut p = Pickle::new(2);
    p.b.extend(std::iter::repeat_n(b']', n));
    p.b.extend(std::iter::repeat_n(b'a', n - 1));
    p.op(STOP);
    let path = tmp("deep_list.pth");
    write_pth(&path, "archive", &p.bytes(), &[]);
    assert!(open_err(&path).contains("a list, not a dict"));
}

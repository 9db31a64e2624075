//! Compiles the BPF programs in `c/` with clang into `OUT_DIR/ballast.bpf.o` (the data plane)
//! and `OUT_DIR/reuseport.bpf.o` (the broker's hot-standby socket selector); the crate embeds
//! the objects with `aya::include_bytes_aligned!`, so every binary carries its programs.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for f in [
        "c/ballast.bpf.c",
        "c/ballast.h",
        "c/lib/maps.h",
        "c/lib/select.h",
        "c/lib/addr.h",
        "c/lib/bytes.h",
        "c/reuseport.bpf.c",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    compile("c/ballast.bpf.c", &out.join("ballast.bpf.o"));
    compile("c/reuseport.bpf.c", &out.join("reuseport.bpf.o"));
}

fn compile(src: &str, obj: &std::path::Path) {
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    // <asm/types.h> lives in the host's multiarch include dir (Debian), e.g.
    // /usr/include/x86_64-linux-gnu or /usr/include/aarch64-linux-gnu.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".to_string());
    let multiarch = format!("-I/usr/include/{arch}-linux-gnu");
    let status = Command::new(&clang)
        .args([
            "-O2", "-g", "-target", "bpf", "-Wall", "-Werror", &multiarch, "-c", src, "-o",
        ])
        .arg(obj)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "{clang} failed ({s}) compiling {src}; the BPF headers come from the \
             Debian packages libbpf-dev and linux-libc-dev (apt-get install libbpf-dev linux-libc-dev)"
        ),
        Err(e) => panic!(
            "cannot run `{clang}` ({e}): the BPF programs need clang; install it with \
             `apt-get install clang llvm libbpf-dev` (or run kind-tests/setup.sh)"
        ),
    }
}

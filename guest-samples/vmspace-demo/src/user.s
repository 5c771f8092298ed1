/*
 * user.s - the user programs that vmspace-demo (Rust, src/user.rs) and
 * guest-samples/c/vmspace_demo.c run in a vmspace (ABI section 7).
 *
 * One source for both vkernels, so that both run the same bytes and print the
 * same text. The Rust guest includes it with global_asm!(options(raw,
 * att_syntax)); the C guest is linked with it (gcc ... vmspace_demo.c
 * user.s). Plain AT&T syntax, no preprocessor, no braces (the Rust side
 * passes the file through unchanged, but keep it that way).
 *
 * Conventions:
 *   - Each program is a blob between vmspace_user_<name>_start and
 *     vmspace_user_<name>_end in section .rodata.vmspace_user: bytes the
 *     vkernel copies into guest RAM frames and maps in the vmspace; never
 *     executed where the linker put them. The entry point is the first byte.
 *   - Position independent: the only memory references inside a blob are
 *     RIP-relative ones to its own labels, resolved by the assembler; every
 *     other address comes in a register. A blob runs at any address.
 *   - At entry: rdi and rsi hold the program's arguments, rsp the top of a
 *     stack (16-byte aligned, demand paged), rflags 0x202.
 *   - System calls: Linux x86-64 numbers and registers (rax = number, rdi,
 *     rsi, rdx = arguments, result in rax; rcx and r11 clobbered). Used:
 *     write 1, getpid 39, exit 60. The same blobs therefore also run as
 *     ordinary Linux code, which is how src/native.rs tests them.
 */

    .pushsection .rodata.vmspace_user, "a", @progbits

/*
 * demo(heap): a sieve of Eratosthenes over DEMO_LIMIT bytes of heap (pages
 * 0..24), a table of Fibonacci numbers that straddles heap pages 31 and 32,
 * and a recursion DEMO_DEPTH calls deep (64 bytes of stack each, so about
 * 16 stack pages). Every heap and stack page is first touched by a write.
 * Prints three lines, each with one write(2), and exits 0 (1 after a short
 * write):
 *
 *   primes below 100000: 9592, sum 454396537
 *   fib(90): 2880067194370816120
 *   sum(1..1000) by recursion: 500500
 */
    .set    DEMO_LIMIT, 100000
    .set    DEMO_FIB_OFF, 0x20000 - 360
    .set    DEMO_FIB_N, 90
    .set    DEMO_DEPTH, 1000
    .set    DEMO_FIB_LAST, DEMO_FIB_N * 8

    .balign 16
    .globl  vmspace_user_demo_start
vmspace_user_demo_start:
    mov     %rdi, %r12                  /* r12: the sieve, heap[0..DEMO_LIMIT) */

    /* Every number is a candidate ... */
    xor     %ecx, %ecx
1:  movb    $1, (%r12,%rcx)
    inc     %rcx
    cmp     $DEMO_LIMIT, %rcx
    jb      1b
    movw    $0, (%r12)                  /* ... but 0 and 1 */

    /* Strike the multiples of each prime i from i*i on, while i*i < LIMIT. */
    mov     $2, %ecx
2:  mov     %rcx, %rax
    imul    %rcx, %rax
    cmp     $DEMO_LIMIT, %rax
    jae     4f
    cmpb    $0, (%r12,%rcx)
    je      3f
5:  movb    $0, (%r12,%rax)
    add     %rcx, %rax
    cmp     $DEMO_LIMIT, %rax
    jb      5b
3:  inc     %rcx
    jmp     2b

    /* r13 = how many primes, r14 = their sum. */
4:  xor     %ecx, %ecx
    xor     %r13d, %r13d
    xor     %r14d, %r14d
6:  cmpb    $0, (%r12,%rcx)
    je      7f
    inc     %r13
    add     %rcx, %r14
7:  inc     %rcx
    cmp     $DEMO_LIMIT, %rcx
    jb      6b

    /* A 256-byte line buffer on the stack, at rsp from here on. */
    sub     $256, %rsp

    /* "primes below <LIMIT>: <count>, sum <sum>\n" */
    mov     %rsp, %rdi
    lea     .Ldemo_s_primes(%rip), %rsi
    call    .Ldemo_append_str
    mov     %rax, %rdi
    mov     $DEMO_LIMIT, %esi
    call    .Ldemo_append_u64
    mov     %rax, %rdi
    lea     .Ldemo_s_colon(%rip), %rsi
    call    .Ldemo_append_str
    mov     %rax, %rdi
    mov     %r13, %rsi
    call    .Ldemo_append_u64
    mov     %rax, %rdi
    lea     .Ldemo_s_sum(%rip), %rsi
    call    .Ldemo_append_str
    mov     %rax, %rdi
    mov     %r14, %rsi
    call    .Ldemo_append_u64
    mov     %rax, %rsi
    call    .Ldemo_write_line

    /* fib[0..=N] in the heap at DEMO_FIB_OFF, across a page boundary. */
    lea     DEMO_FIB_OFF(%r12), %r15
    movq    $0, (%r15)
    movq    $1, 8(%r15)
    mov     $2, %ecx
8:  mov     -8(%r15,%rcx,8), %rax
    add     -16(%r15,%rcx,8), %rax
    mov     %rax, (%r15,%rcx,8)
    inc     %rcx
    cmp     $DEMO_FIB_N, %rcx
    jbe     8b

    /* "fib(<N>): <fib[N]>\n" */
    mov     %rsp, %rdi
    lea     .Ldemo_s_fib(%rip), %rsi
    call    .Ldemo_append_str
    mov     %rax, %rdi
    mov     $DEMO_FIB_N, %esi
    call    .Ldemo_append_u64
    mov     %rax, %rdi
    lea     .Ldemo_s_fib2(%rip), %rsi
    call    .Ldemo_append_str
    mov     %rax, %rdi
    mov     DEMO_FIB_LAST(%r15), %rsi
    call    .Ldemo_append_u64
    mov     %rax, %rsi
    call    .Ldemo_write_line

    /* "sum(1..<DEPTH>) by recursion: <sum>\n" */
    mov     $DEMO_DEPTH, %edi
    call    .Ldemo_rsum
    mov     %rax, %rbx
    mov     %rsp, %rdi
    lea     .Ldemo_s_rsum(%rip), %rsi
    call    .Ldemo_append_str
    mov     %rax, %rdi
    mov     $DEMO_DEPTH, %esi
    call    .Ldemo_append_u64
    mov     %rax, %rdi
    lea     .Ldemo_s_rsum2(%rip), %rsi
    call    .Ldemo_append_str
    mov     %rax, %rdi
    mov     %rbx, %rsi
    call    .Ldemo_append_u64
    mov     %rax, %rsi
    call    .Ldemo_write_line

    xor     %edi, %edi
    mov     $60, %eax                   /* exit(0) */
    syscall
    ud2

/* rsum(rdi = n) -> rax = n + (n - 1) + ... + 1, one 64-byte frame a level,
 * each written on the way down. Clobbers rdi. */
.Ldemo_rsum:
    test    %rdi, %rdi
    jz      1f
    push    %rdi
    sub     $48, %rsp
    mov     %rdi, (%rsp)
    dec     %rdi
    call    .Ldemo_rsum
    add     $48, %rsp
    pop     %rdi
    add     %rdi, %rax
    ret
1:  xor     %eax, %eax
    ret

/* append_str(rdi = dst, rsi = NUL-terminated src) -> rax = end of dst.
 * Clobbers rsi, rdi. */
.Ldemo_append_str:
1:  movb    (%rsi), %al
    test    %al, %al
    jz      2f
    mov     %al, (%rdi)
    inc     %rsi
    inc     %rdi
    jmp     1b
2:  mov     %rdi, %rax
    ret

/* append_u64(rdi = dst, rsi = value) -> rax = end of dst: the decimal digits.
 * Clobbers rcx, rdx, rdi, r8, r9. */
.Ldemo_append_u64:
    sub     $32, %rsp
    lea     32(%rsp), %r8               /* digits go down from here */
    mov     %r8, %r9
    mov     %rsi, %rax
    mov     $10, %ecx
1:  xor     %edx, %edx
    div     %rcx
    add     $48, %dl
    dec     %r8
    mov     %dl, (%r8)
    test    %rax, %rax
    jnz     1b
2:  movb    (%r8), %al
    mov     %al, (%rdi)
    inc     %r8
    inc     %rdi
    cmp     %r9, %r8
    jb      2b
    add     $32, %rsp
    mov     %rdi, %rax
    ret

/* write_line(rsi = end of the line in the buffer at the caller's rsp):
 * append '\n' and write(1, buffer, length); exit(1) on a short write.
 * Clobbers rax, rcx, rdx, rsi, rdi, r11. */
.Ldemo_write_line:
    movb    $10, (%rsi)
    lea     8(%rsp), %rdi               /* the caller's rsp: our return address is below */
    lea     1(%rsi), %rdx
    sub     %rdi, %rdx
    mov     %rdi, %rsi
    mov     $1, %edi
    mov     $1, %eax                    /* write(1, buffer, length) */
    syscall
    cmp     %rdx, %rax
    jne     1f
    ret
1:  mov     $1, %edi
    mov     $60, %eax                   /* exit(1) */
    syscall
    ud2

.Ldemo_s_primes:
    .asciz  "primes below "
.Ldemo_s_colon:
    .asciz  ": "
.Ldemo_s_sum:
    .asciz  ", sum "
.Ldemo_s_fib:
    .asciz  "fib("
.Ldemo_s_fib2:
    .asciz  "): "
.Ldemo_s_rsum:
    .asciz  "sum(1.."
.Ldemo_s_rsum2:
    .asciz  ") by recursion: "
    .globl  vmspace_user_demo_end
vmspace_user_demo_end:

/*
 * syscall_loop(n): one getpid as a marker (the vkernel starts its clock at
 * the first system call), then n more getpids, each checked to answer what
 * the first did; exit(0), or exit(1) at the first different answer. Touches
 * no memory but its code, so no page faults once the code is in.
 */
    .balign 16
    .globl  vmspace_user_syscall_loop_start
vmspace_user_syscall_loop_start:
    mov     %rdi, %rbx                  /* rbx: calls left */
    mov     $39, %eax                   /* getpid(): the marker */
    syscall
    mov     %rax, %r12                  /* r12: the answer */
1:  test    %rbx, %rbx
    jz      2f
    mov     $39, %eax
    syscall
    cmp     %r12, %rax
    jne     3f
    dec     %rbx
    jmp     1b
2:  xor     %edi, %edi
    mov     $60, %eax                   /* exit(0) */
    syscall
    ud2
3:  mov     $1, %edi
    mov     $60, %eax                   /* exit(1) */
    syscall
    ud2
    .globl  vmspace_user_syscall_loop_end
vmspace_user_syscall_loop_end:

/*
 * touch(base, n): one getpid as a marker (the clock starts), then store i
 * into the first word of page i of base for i in 0..n (a write fault on each
 * fresh page), exit(0).
 */
    .balign 16
    .globl  vmspace_user_touch_start
vmspace_user_touch_start:
    mov     %rdi, %rbx                  /* rbx: base */
    mov     %rsi, %r12                  /* r12: pages */
    mov     $39, %eax                   /* getpid(): the marker */
    syscall
    xor     %ecx, %ecx
1:  cmp     %r12, %rcx
    jae     2f
    mov     %rcx, %rax
    shl     $12, %rax
    mov     %rcx, (%rbx,%rax)
    inc     %rcx
    jmp     1b
2:  xor     %edi, %edi
    mov     $60, %eax                   /* exit(0) */
    syscall
    ud2
    .globl  vmspace_user_touch_end
vmspace_user_touch_end:

    .popsection

    /* No executable stack for whoever links this file. */
    .section .note.GNU-stack, "", @progbits

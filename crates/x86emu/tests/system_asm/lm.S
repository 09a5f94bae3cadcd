/* 64-bit test code, loaded at 0x10000. The test (tests/system.rs) builds
 * the GDT, IDT, TSS and page tables; see `Env::long` there.
 * 0x10000 + v*16: handler for vector v: r15 = v, then HLT with the frame
 * left on the stack. */
	.code64
	.altmacro
	.macro stub n
	.org	\n * 16
	movl	$\n, %r15d
	hlt
	.endm
	.set	i, 0
	.rept	256
	stub	%i
	.set	i, i + 1
	.endr

/* 0x11000: from CPL 0, IRETQ to user code, which raises INT 0x80. */
	.org	0x1000
to_user:
	push	$0x2b			/* SS */
	push	$0x50000		/* RSP */
	push	$0x202			/* RFLAGS: IF */
	push	$0x33			/* CS */
	lea	user_int(%rip), %rax
	push	%rax
	iretq
	.org	0x1040
user_int:
	mov	$0x1234, %ebx
	int	$0x80
	mov	%ebx, %ecx
	mov	%cs, %edx
	ud2

/* 0x11100: IRETQ (the test jumps here from a stub to return). */
	.org	0x1100
	iretq

/* 0x11200: SYSCALL/SYSRET round trip. */
	.org	0x1200
syscall_setup:
	/* Only MOV-class and system instructions (ALU is tested elsewhere). */
	mov	$0xc0000080, %ecx
	mov	$0xd01, %eax		/* NXE LMA LME SCE */
	mov	$0, %edx
	wrmsr
	mov	$0xc0000081, %ecx
	mov	$0, %eax
	mov	$0x00230010, %edx	/* SYSRET base 0x23, SYSCALL CS 0x10 */
	wrmsr
	mov	$0xc0000082, %ecx
	lea	sys_entry(%rip), %rax
	mov	$0, %edx
	wrmsr
	mov	$0xc0000084, %ecx
	mov	$0x4700, %eax		/* NT DF IF TF */
	wrmsr
	push	$0x2b
	push	$0x50000
	push	$0x202
	push	$0x33
	lea	user_sys(%rip), %rax
	push	%rax
	iretq
user_sys:
	std
	lea	first(%rip), %rax	/* where the kernel entry goes */
	syscall
after_syscall:
	mov	%rax, %rbx
	mov	%cs, %esi
	mov	%ss, %ebp
	lea	second(%rip), %rax
	syscall
sys_entry:
	jmp	*%rax
first:
	pushfq
	pop	%r14
	mov	%r11, %r12
	mov	%rcx, %r13
	mov	%cs, %r10d
	mov	$99, %eax
	sysretq
second:
	hlt

/* 0x11400: HLT with interrupts enabled, then more code. */
	.org	0x1400
	sti
	hlt
	mov	$5, %ebx
	hlt

/* 0x11440: interrupt shadow after STI. */
	.org	0x1440
	sti
	mov	$1, %ebx
	mov	$2, %ebx
	hlt

/* 0x11480: MOV CR3 flushes the TLB. RDI = address of PD[1]. */
	.org	0x1480
	mov	0x200000, %rax
	mov	0x201000, %r8		/* caches a second 4 KiB piece */
	movq	$0x87, (%rdi)		/* PD[1] -> physical 0 */
	mov	0x200000, %rbx		/* stale TLB entry */
	mov	%cr3, %rcx
	mov	%rcx, %cr3
	mov	0x200000, %rcx
	mov	0x201000, %r10		/* now physical 0x1000 */
	movq	$0x200087, (%rdi)	/* back to physical 2 MiB */
	invlpg	0x200000		/* must drop the whole 2 MiB page */
	mov	0x201000, %r9
	hlt

/* 0x11500: port I/O. */
	.org	0x1500
	mov	$0x3f8, %dx
	mov	$0x41, %al
	out	%al, %dx
	mov	$0xbeef, %ax
	out	%ax, $0x80
	in	$0x71, %al
	mov	%eax, %ebx
	mov	$0x510, %dx
	in	%dx, %eax
	mov	%eax, %ecx
	hlt

/* 0x11580: user-mode I/O through the TSS bitmap. */
	.org	0x1580
	mov	$0x3f8, %dx
	out	%al, %dx
	mov	$0x3f9, %dx
	out	%al, %dx
	hlt

/* 0x11600: MSRs. */
	.org	0x1600
	mov	$0x6e0, %ecx		/* claimed by the bus */
	rdmsr
	mov	%eax, %ebx
	mov	$0x10, %ecx		/* TSC := 0x100000000000 */
	mov	$0, %eax
	mov	$0x1000, %edx
	wrmsr
	rdtsc
	mov	%rdx, %rsi
	mov	$0x1234, %ecx		/* unknown: #GP */
	rdmsr
	hlt

/* 0x11680: CPUID. */
	.org	0x1680
	cpuid
	hlt

/* 0x116c0: user-mode page fault on a write to an unmapped page. */
	.org	0x16c0
	movq	$1, 0x400010
	hlt

/* 0x11700: INT3 and INT n at CPL 0. */
	.org	0x1700
	int3
	hlt
	.org	0x1710
	int	$0x81
	hlt

/* 0x11800: privileged instructions, 16 bytes apart, run at CPL 3. */
	.org	0x1800
	hlt
	.org	0x1810
	cli
	.org	0x1820
	mov	%cr3, %rax
	.org	0x1830
	mov	%rax, %cr0
	.org	0x1840
	wrmsr
	.org	0x1850
	rdmsr
	.org	0x1860
	lgdt	0x1000
	.org	0x1870
	invlpg	0x1000
	.org	0x1880
	swapgs
	.org	0x1890
	in	$0x60, %al
	.org	0x18a0
	sysretq
	.org	0x18b0
	mov	%db7, %rax
	.org	0x18c0
	lidt	0x1000
	.org	0x18d0
	ltr	%ax
	.org	0x18e0
	clts
	.org	0x18f0
	wbinvd
	.org	0x1900
	mov	$0x18, %eax
	mov	%eax, %ss		/* DPL 0 stack at CPL 3: #GP(0x18) */
	.org	0x1910
	int	$0x81			/* DPL 0 gate: #GP(0x81*8+2) */

/* 0x11a00: far return to compatibility mode and back by INT. */
	.org	0x1a00
	push	$0x2b			/* SS */
	push	$0x50000		/* RSP */
	push	$0x23			/* 32-bit user CS */
	lea	compat(%rip), %rax
	push	%rax
	lretq
	.code32
compat:
	mov	$0x2b, %eax
	mov	%eax, %ds
	mov	$7, %ebx
	int	$0x80
	mov	%ds, %ecx
	ud2
	.code64

/* 0x11b00: ENTER with two nesting levels. */
	.org	0x1b00
	enter	$16, $2
	hlt

/* 0x11c00: LTR, STR, LAR, LSL, VERW, SGDT/LGDT at CPL 0. */
	.org	0x1c00
	mov	$0x40, %eax
	ltr	%ax
	str	%ebx
	mov	$0x2b, %ecx
	lar	%ecx, %edx
	lsl	%ecx, %esi
	verw	%cx
	pushfq
	pop	%r8
	mov	$0x48, %ecx		/* upper half of the TSS descriptor */
	lar	%ecx, %r9d
	pushfq
	pop	%r10
	sgdt	0x70000
	lgdt	0x70000
	hlt

/* 0x11d00: SYSEXITQ to user mode and SYSENTER back. */
	.org	0x1d00
	mov	$0x174, %ecx
	mov	$0x10, %eax
	mov	$0, %edx
	wrmsr
	mov	$0x175, %ecx
	mov	$0x88000, %eax
	wrmsr
	mov	$0x176, %ecx
	lea	sysenter_entry(%rip), %rax
	wrmsr
	lea	user_se(%rip), %rdx
	mov	$0x50000, %ecx
	sysexitq
user_se:
	mov	%cs, %ebx
	mov	%ss, %esi
	sysenter
sysenter_entry:
	mov	%cs, %edi
	hlt

/* 0x11e00: POPF at CPL 3 cannot change IF or IOPL. */
	.org	0x1e00
	push	$0x3602			/* IOPL 3, DF, IF */
	popfq
	pushfq
	pop	%rbx
	hlt

/* 0x11e40: reserved CR4 bit (FSGSBASE is not offered). */
	.org	0x1e40
	mov	$0x10020, %eax
	mov	%rax, %cr4
	hlt


"""The disk pattern the block-device drivers (blktest, nvmetest, ahcitest) write and check.

Qword k of sector s holds ``mix(SEED, s * 64 + k)``; reading back, every qword is compared and
folded into the digest. The Python side of the same computation is
``blktest.reference_image`` / ``blktest.reference_digest``. The routines expect, in the program
that includes them: the constants SEED, MIX_INCREMENT and MIX_MULTIPLIER, the variable
``var_digest``, the messages ``msg_mismatch``, ``msg_qword`` and ``msg_newline``, and the
library's PRINT/PRINT_DEC macros and ``poweroff``. Sectors here are the device's blocks (512
bytes for all three).
"""

ROUTINES = """; pattern_qword: rax = index -> rax = mix(SEED, index)
pattern_qword:
        push rcx
        movabs rcx, SEED
        xor rax, rcx
        movabs rcx, MIX_INCREMENT
        add rax, rcx
        movabs rcx, MIX_MULTIPLIER
        mul rax, rcx
        mov rcx, rax
        shr rcx, 31
        xor rax, rcx
        pop rcx
        ret

; fill_buffer: rsi = buffer, r14 = first sector, r10 = sectors
fill_buffer:
        push rax
        push rbx
        push rdx
        push rdi
        mov rbx, r14
        shl rbx, 6                      ; rbx = pattern index
        mov rdx, r10
        shl rdx, 6
        add rdx, rbx                    ; rdx = end index
        mov rdi, rsi
fill_next:
        mov rax, rbx
        call pattern_qword
        st64 [rdi], rax
        add rdi, 8
        inc rbx
        cmp rbx, rdx
        jb fill_next
        pop rdi
        pop rdx
        pop rbx
        pop rax
        ret

; check_buffer: rsi = buffer, rbx = first sector, r10 = sectors; compares and folds the digest
check_buffer:
        push rax
        push rbx
        push rdx
        push rdi
        push r11
        push r13
        shl rbx, 6
        mov rdx, r10
        shl rdx, 6
        add rdx, rbx
        mov rdi, rsi
        mov r11, var_digest
        ld64 r13, [r11]
check_next:
        mov rax, rbx
        call pattern_qword
        ld64 r8, [rdi]
        cmp rax, r8
        jne check_bad
        xor r13, r8                     ; digest = mix(digest, value)
        movabs rax, MIX_INCREMENT
        add r13, rax
        movabs rax, MIX_MULTIPLIER
        mul r13, rax
        mov rax, r13
        shr rax, 31
        xor r13, rax
        add rdi, 8
        inc rbx
        cmp rbx, rdx
        jb check_next
        st64 [r11], r13
        pop r13
        pop r11
        pop rdi
        pop rdx
        pop rbx
        pop rax
        ret
check_bad:
        PRINT msg_mismatch
        mov rax, rbx
        shr rax, 6
        PRINT_DEC rax
        PRINT msg_qword
        mov rax, rbx
        and rax, 63
        PRINT_DEC rax
        PRINT msg_newline
        call poweroff
"""
